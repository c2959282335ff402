//! Image import: from a local path, an http URL or a streamed upload, into
//! `<data>/images/<id>.raw`, with progress, an optional SHA-256 check and
//! qcow2 conversion (qemu-img, until keel-vmm reads qcow2 itself).
//!
//! Bytes land in `<id>.partial` first; only a complete, verified, converted
//! image is renamed into place, so an interrupted import never leaves a
//! usable half image, and its space is given back at once.

use std::path::Path;
use std::sync::Arc;

mod download;

pub use download::{
    AddressDenied, Cidr, CidrError, DownloadError, HttpUrl, Scheme, cancel as cancel_download,
    check_url, parse_http_url,
};

use futures_util::{Stream, StreamExt};
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use thiserror::Error;

use crate::control::operations::Progress;
use crate::keel::Keel;
use crate::model::{ImageFormat, ImageStatus};
use crate::quota::QuotaError;
use crate::store::StoreError;

/// Why an import failed; recorded as the image's `status_reason`.
#[derive(Debug, Error)]
pub enum ImportError {
    #[error("Cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the image")]
    Write(#[source] std::io::Error),
    #[error("Cannot read the source file")]
    Read(#[source] std::io::Error),
    #[error("The upload was cut short: {0}")]
    UploadCut(String),
    #[error("The upload was cut short: {got} of {want} bytes arrived")]
    UploadShort { got: u64, want: u64 },
    #[error("Checksum mismatch: the data's SHA-256 is {sha}, {expected} was expected")]
    Checksum { sha: String, expected: String },
    #[error("Image {0} was deleted during its import")]
    Deleted(String),
    #[error("Cannot read what was imported")]
    Head(#[source] std::io::Error),
    #[error("The data is {found:?} but the image was declared {declared:?}; give format={give}")]
    Format {
        found: ImageFormat,
        declared: ImageFormat,
        give: String,
    },
    #[error("Cannot run qemu-img to convert the qcow2 image; install qemu-utils")]
    QemuImgMissing(#[source] std::io::Error),
    #[error("qemu-img could not convert the image: {0}")]
    QemuImg(String),
    #[error("Cannot put the image in place")]
    Rename(#[source] std::io::Error),
    #[error("Cannot create the {what} {path}")]
    BootFileCreate {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot copy the {what}")]
    BootFileCopy {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Download(#[from] download::DownloadError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where an image's bytes come from.
#[derive(Debug)]
pub enum Source {
    /// A file already opened and checked (see [`crate::host_files`]).
    File(std::fs::File),
    Url(String),
}

/// Receives an image's bytes, hashing and counting them.
pub(crate) struct Sink {
    file: tokio::fs::File,
    hasher: Sha256,
    pub(crate) written: u64,
    total: Option<u64>,
    last_percent: u8,
}

impl Sink {
    pub(crate) async fn create(path: &Path, total: Option<u64>) -> Result<Sink, ImportError> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|source| ImportError::Create {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Sink {
            file,
            hasher: Sha256::new(),
            written: 0,
            total,
            last_percent: 0,
        })
    }

    pub(crate) async fn write(
        &mut self,
        chunk: &[u8],
        keel: &Keel,
        image: &str,
        op: Option<&Progress>,
    ) -> Result<(), ImportError> {
        // Zeros become holes: a mostly empty disk image stays sparse.
        if chunk.iter().all(|&b| b == 0) {
            self.file
                .seek(std::io::SeekFrom::Current(chunk.len() as i64))
                .await
                .map_err(ImportError::Write)?;
        } else {
            self.file
                .write_all(chunk)
                .await
                .map_err(ImportError::Write)?;
        }
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        if let Some(total) = self.total.filter(|t| *t > 0) {
            // Copying is 90% of the work; checking and conversion the rest.
            let percent = (self.written.min(total) * 90 / total) as u8;
            if percent != self.last_percent {
                self.last_percent = percent;
                set_progress(keel, image, percent);
                if let Some(op) = op {
                    op.set(percent);
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn finish(self) -> Result<(u64, String), ImportError> {
        self.file
            .set_len(self.written)
            .await
            .map_err(ImportError::Write)?;
        self.file.sync_all().await.map_err(ImportError::Write)?;
        Ok((self.written, hex::encode(self.hasher.finalize())))
    }
}

fn set_progress(keel: &Keel, id: &str, percent: u8) {
    let _ = keel.images.update::<StoreError>(id, |img| {
        img.progress = percent;
        Ok(())
    });
}

fn fail(keel: &Keel, id: &str, reason: &str) {
    let _ = std::fs::remove_file(keel.paths.image_file(id, "partial"));
    let _ = keel.images.update::<StoreError>(id, |img| {
        img.status = ImageStatus::Error;
        img.status_reason = reason.to_string();
        img.progress = 0;
        img.reserved = 0;
        Ok(())
    });
}

/// An import a keeld restart cut short: its image is `error` and every
/// file it had begun is removed.
pub fn interrupted(keel: &Keel, id: &str) {
    for what in [
        "partial",
        "converting",
        "raw",
        "kernel",
        "initramfs",
        "spare",
        "spare-copying",
    ] {
        let _ = std::fs::remove_file(keel.paths.image_file(id, what));
    }
    fail(
        keel,
        id,
        "keeld restarted during the import; delete the image and import it again",
    );
}

/// Imports from a path or URL (run as an operation).
pub async fn import(
    keel: Arc<Keel>,
    id: String,
    source: Source,
    expected_sha256: Option<String>,
    op: Progress,
) -> Result<(), ImportError> {
    let partial = keel.paths.image_file(&id, "partial");
    let copied = match source {
        Source::File(file) => copy_file(&keel, &id, file, &partial, &op).await,
        Source::Url(url) => download::download(&keel, &id, &url, &partial, &op)
            .await
            .map_err(ImportError::from),
    };
    let result = match copied {
        Ok((size, sha)) => finish(&keel, &id, size, &sha, expected_sha256.as_deref()).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        fail(&keel, &id, &keel_api::error_chain(e));
    }
    result
}

/// Why an upload failed.
#[derive(Debug, Error)]
pub enum UploadError {
    /// Over the project's quota or the host's free space (its own status).
    #[error(transparent)]
    Room(QuotaError),
    #[error(transparent)]
    Failed(#[from] ImportError),
}

/// How much of a failed upload's remaining body is read and dropped, so
/// the client gets the error answer instead of a reset connection.
const DRAIN_MAX: u64 = 256 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// Room is checked again each time this much more has arrived than was
/// checked for.
const ROOM_STEP: u64 = 64 << 20;

/// Receives an upload's body (its length when the client gave one; its
/// room was checked against the quota and free space for that length).
pub async fn upload<S, E>(
    keel: Arc<Keel>,
    id: String,
    project: &str,
    mut body: S,
    length: Option<u64>,
    expected_sha256: Option<String>,
) -> Result<(), UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let partial = keel.paths.image_file(&id, "partial");
    let mut checked = length.unwrap_or(0);
    let received = async {
        let mut sink = Sink::create(&partial, length).await?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ImportError::UploadCut(e.to_string()))?;
            if sink.written + chunk.len() as u64 > checked {
                checked = sink.written + chunk.len() as u64 + ROOM_STEP;
                crate::quota::check_image(&keel, project, &id, checked)
                    .map_err(UploadError::Room)?;
            }
            if let Err(e) = sink.write(&chunk, &keel, &id, None).await {
                // A write that failed on a full file system is answered as such.
                return Err(match crate::quota::check_space(&keel.paths.images(), 0) {
                    Err(full) => UploadError::Room(full),
                    Ok(()) => UploadError::Failed(e),
                });
            }
        }
        if let Some(length) = length
            && sink.written != length
        {
            return Err(ImportError::UploadShort {
                got: sink.written,
                want: length,
            }
            .into());
        }
        Ok(sink.finish().await?)
    }
    .await;
    let result = match received {
        Ok((size, sha)) => finish(&keel, &id, size, &sha, expected_sha256.as_deref())
            .await
            .map_err(UploadError::Failed),
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        fail(&keel, &id, &keel_api::error_chain(e));
        // The rest of the body is read (within bounds) and dropped, so the
        // client reads the answer.
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            let mut drained = 0u64;
            while drained < DRAIN_MAX {
                match body.next().await {
                    Some(Ok(chunk)) => drained += chunk.len() as u64,
                    _ => break,
                }
            }
        })
        .await;
    }
    result
}

async fn copy_file(
    keel: &Keel,
    id: &str,
    from: std::fs::File,
    to: &Path,
    op: &Progress,
) -> Result<(u64, String), ImportError> {
    let mut file = tokio::fs::File::from_std(from);
    let total = file.metadata().await.map(|m| m.len()).ok();
    let mut sink = Sink::create(to, total).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use tokio::io::AsyncReadExt;
        let n = file.read(&mut buf).await.map_err(ImportError::Read)?;
        if n == 0 {
            break;
        }
        sink.write(&buf[..n], keel, id, Some(op)).await?;
    }
    sink.finish().await
}

/// What the bytes are, from their magic numbers.
pub fn sniff(head: &[u8]) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if head.len() >= 0x8006 && &head[0x8001..0x8006] == b"CD001" {
        ImageFormat::Iso
    } else {
        ImageFormat::Raw
    }
}

async fn finish(
    keel: &Arc<Keel>,
    id: &str,
    size: u64,
    sha: &str,
    expected: Option<&str>,
) -> Result<(), ImportError> {
    if let Some(expected) = expected
        && !expected.eq_ignore_ascii_case(sha)
    {
        return Err(ImportError::Checksum {
            sha: sha.to_string(),
            expected: expected.to_string(),
        });
    }
    let image = keel
        .images
        .get(id)
        .ok_or_else(|| ImportError::Deleted(id.to_string()))?;
    let partial = keel.paths.image_file(id, "partial");
    let head = crate::files::read_head(&partial, 0x8006).map_err(ImportError::Head)?;
    let found = sniff(&head);
    // An ISO may hold anything, and a raw disk may look like an ISO: only
    // a declared qcow2 must be one, and a qcow2 must be declared.
    if (found == ImageFormat::Qcow2) != (image.source_format == ImageFormat::Qcow2) {
        return Err(ImportError::Format {
            found,
            declared: image.source_format,
            give: serde_json::to_value(found)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        });
    }
    let target = keel.paths.image_disk(id);
    let size = if found == ImageFormat::Qcow2 {
        set_progress(keel, id, 92);
        let converted = keel.paths.image_file(id, "converting");
        let output = tokio::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&partial)
            .arg(&converted)
            .output()
            .await
            .map_err(ImportError::QemuImgMissing)?;
        let _ = std::fs::remove_file(&partial);
        if !output.status.success() {
            let _ = std::fs::remove_file(&converted);
            return Err(ImportError::QemuImg(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ));
        }
        std::fs::rename(&converted, &target).map_err(ImportError::Rename)?;
        std::fs::metadata(&target).map(|m| m.len()).unwrap_or(size)
    } else {
        std::fs::rename(&partial, &target).map_err(ImportError::Rename)?;
        size
    };
    keel.images.update::<StoreError>(id, |img| {
        img.status = ImageStatus::Ready;
        img.status_reason.clear();
        img.progress = 100;
        img.reserved = 0;
        img.size = size;
        img.sha256 = sha.to_string();
        Ok(())
    })?;
    crate::control::images::ready(keel, id);
    Ok(())
}

/// Copies a kernel or initramfs that comes with an image (mode 0600,
/// whatever the source's).
pub fn copy_boot_file(
    keel: &Keel,
    image: &str,
    what: &str,
    mut from: std::fs::File,
) -> Result<(), ImportError> {
    use std::os::unix::fs::OpenOptionsExt;
    let to = keel.paths.image_file(image, what);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&to)
        .map_err(|source| ImportError::BootFileCreate {
            what: what.to_string(),
            path: to.display().to_string(),
            source,
        })?;
    std::io::copy(&mut from, &mut out)
        .map(|_| ())
        .map_err(|source| ImportError::BootFileCopy {
            what: what.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_magic() {
        assert_eq!(sniff(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        let mut iso = vec![0u8; 0x8006];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(sniff(&iso), ImageFormat::Iso);
        assert_eq!(sniff(&[0u8; 512]), ImageFormat::Raw);
        assert_eq!(sniff(b""), ImageFormat::Raw);
    }
}
