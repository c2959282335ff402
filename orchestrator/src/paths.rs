//! Where things live under keeld's data dir. Both halves use it: the
//! control plane for its store and images, the node agent for disks and
//! VM directories (in a cluster, each node has its own).

use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        Paths {
            root: root.to_path_buf(),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("keel.db")
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn image_disk(&self, id: &str) -> PathBuf {
        self.images().join(format!("{id}.raw"))
    }
    pub fn image_file(&self, id: &str, what: &str) -> PathBuf {
        self.images().join(format!("{id}.{what}"))
    }
    pub fn disks(&self) -> PathBuf {
        self.root.join("disks")
    }
    pub fn disk(&self, id: &str) -> PathBuf {
        self.disks().join(format!("{id}.raw"))
    }
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms().join(id)
    }
    pub fn admin_password(&self) -> PathBuf {
        self.root.join("initial-admin-password")
    }
}
