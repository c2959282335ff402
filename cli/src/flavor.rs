//! `keel flavors`: the shapes VMs are made in.

use keel_api::keeld::Flavor;

use crate::output::{cell, print_table};
use crate::session::{Common, Error, client, typed};

pub fn list(common: &Common) -> Result<(), Error> {
    let list = client(common)?.get("/api/v1/flavors")?;
    if common.json {
        println!("{list}");
    } else {
        let flavors: Vec<Flavor> = typed("list of flavors", &list)?;
        let rows: Vec<Vec<String>> = flavors
            .iter()
            .map(|f| vec![cell(&f.id), cell(&f.vcpus), cell(&f.memory_mib)])
            .collect();
        print_table(&["NAME", "VCPUS", "MEMORY_MIB"], &rows);
    }
    Ok(())
}
