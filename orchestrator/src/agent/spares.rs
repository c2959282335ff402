//! A spare system disk per image, copied ahead of time.
//!
//! Where the filesystem has no reflinks (ext4, tmpfs), a thin copy still
//! reads and writes every data block of the image: seconds for a distro
//! image. Keeping one finished copy per image beside it turns the next VM
//! create into a rename; a new spare is copied in the background. Images
//! never change once ready, so a spare cannot go stale. The cost is one
//! image's worth of space per image.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::files;
use crate::paths::Paths;

pub struct Spares {
    paths: Paths,
    /// Images whose spare is being copied.
    copying: Mutex<HashSet<String>>,
}

impl Spares {
    pub fn new(paths: Paths) -> Arc<Self> {
        Arc::new(Spares {
            paths,
            copying: Mutex::new(HashSet::new()),
        })
    }

    fn spare_path(&self, image: &str) -> std::path::PathBuf {
        self.paths.image_file(image, "spare")
    }

    fn copying(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.copying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts copying a spare for `image` unless there is one or one is on
    /// its way.
    pub fn ensure(self: &Arc<Self>, image: &str) {
        let spare = self.spare_path(image);
        if spare.exists() || !self.copying().insert(image.to_string()) {
            return;
        }
        let this = self.clone();
        let image = image.to_string();
        tokio::task::spawn_blocking(move || {
            let source = this.paths.image_disk(&image);
            let tmp = this.paths.image_file(&image, "spare-copying");
            let _ = std::fs::remove_file(&tmp);
            let copied = files::thin_copy(&source, &tmp, |_, _| {})
                .map_err(|e| e.to_string())
                .and_then(|()| std::fs::rename(&tmp, &spare).map_err(|e| e.to_string()));
            if let Err(e) = copied {
                let _ = std::fs::remove_file(&tmp);
                log::warn!("Cannot prepare a spare disk of image {image}: {e}");
            }
            // The image may have been deleted meanwhile.
            if !source.exists() {
                let _ = std::fs::remove_file(&spare);
            }
            this.copying().remove(&image);
        });
    }

    /// Moves the image's spare to `to` if there is one (and starts the
    /// next).
    pub fn take(self: &Arc<Self>, image: &str, to: &Path) -> bool {
        let taken = std::fs::rename(self.spare_path(image), to).is_ok();
        self.ensure(image);
        taken
    }

    /// Forgets an image's spare (the image is being deleted).
    pub fn remove(&self, image: &str) {
        let _ = std::fs::remove_file(self.spare_path(image));
    }
}
