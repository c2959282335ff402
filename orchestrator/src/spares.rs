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
use crate::keel::Keel;

#[derive(Default)]
pub struct Spares {
    /// Images whose spare is being copied.
    copying: Mutex<HashSet<String>>,
}

fn spare_path(keel: &Keel, image: &str) -> std::path::PathBuf {
    keel.paths.image_file(image, "spare")
}

/// Starts copying a spare for `image` unless there is one or one is on its
/// way.
pub fn ensure(keel: &Arc<Keel>, image: &str) {
    let spare = spare_path(keel, image);
    if spare.exists() {
        return;
    }
    if !keel
        .spares
        .copying
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(image.to_string())
    {
        return;
    }
    let keel = keel.clone();
    let image = image.to_string();
    tokio::task::spawn_blocking(move || {
        let tmp = keel.paths.image_file(&image, "spare-copying");
        let _ = std::fs::remove_file(&tmp);
        let copied = files::thin_copy(&keel.paths.image_disk(&image), &tmp, |_, _| {})
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::rename(&tmp, &spare).map_err(|e| e.to_string()));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            log::warn!("Cannot prepare a spare disk of image {image}: {e}");
        }
        // The image may have been deleted meanwhile.
        if keel.images.get(&image).is_none() {
            let _ = std::fs::remove_file(&spare);
        }
        keel.spares
            .copying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&image);
    });
}

/// Moves the image's spare to `to` if there is one (and starts the next).
pub fn take(keel: &Arc<Keel>, image: &str, to: &Path) -> bool {
    let taken = std::fs::rename(spare_path(keel, image), to).is_ok();
    ensure(keel, image);
    taken
}

/// Forgets an image's spare (the image is being deleted).
pub fn remove(keel: &Keel, image: &str) {
    let _ = std::fs::remove_file(spare_path(keel, image));
}
