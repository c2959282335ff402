//! `keel node`: the node's capacity, allocation and VM counts
//! (`keel_api::keeld::NodeSummary`), shown as keeld sends them.

use crate::output::show;
use crate::session::{Common, Error, client};

pub fn show_node(common: &Common) -> Result<(), Error> {
    show(common, &client(common)?.get("/api/v1/node")?);
    Ok(())
}
