//! A minimal ISO 9660 writer: one root directory of small files, with a
//! Joliet tree so names keep their case and dashes (`user-data`). Enough
//! for a cloud-init NoCloud seed; no external tool needed.
//!
//! Layout (2048-byte sectors): 0–15 system area, 16 primary volume
//! descriptor, 17 Joliet supplementary descriptor, 18 terminator, 19–22
//! path tables (primary L/M, Joliet L/M), 23 primary root directory, 24
//! Joliet root directory, then the files' data.

const SECTOR: usize = 2048;
const FIRST_FILE: u32 = 25;

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

fn padded(s: &[u8], len: usize, pad: u8) -> Vec<u8> {
    let mut v = s[..s.len().min(len)].to_vec();
    v.resize(len, pad);
    v
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_be_bytes()).collect()
}

/// A directory record (ECMA-119 9.1).
fn dir_record(extent: u32, size: u32, is_dir: bool, name: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    // Recording date: 2000-01-01 00:00:00 UTC (years since 1900).
    r[18..25].copy_from_slice(&[100, 1, 1, 0, 0, 0, 0]);
    r[25] = if is_dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r.extend_from_slice(name);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

/// A primary-tree name: d-characters, 8.3, `;1`.
fn primary_name(name: &str) -> Vec<u8> {
    let d_chars = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| match c {
                'a'..='z' => c.to_ascii_uppercase(),
                'A'..='Z' | '0'..='9' => c,
                _ => '_',
            })
            .take(max)
            .collect()
    };
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    format!("{}.{};1", d_chars(stem, 8), d_chars(ext, 3)).into_bytes()
}

fn volume_descriptor(
    joliet: bool,
    label: &str,
    sectors: u32,
    root: u32,
    path_l: u32,
    path_m: u32,
) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let text = |s: &str, len: usize| {
        if joliet {
            let mut v = ucs2(s);
            v.truncate(len);
            while v.len() < len {
                v.extend_from_slice(&[0, b' ']);
            }
            v.truncate(len);
            v
        } else {
            padded(s.as_bytes(), len, b' ')
        }
    };
    d[8..40].copy_from_slice(&text("LINUX", 32));
    d[40..72].copy_from_slice(&text(label, 32));
    d[80..88].copy_from_slice(&both32(sectors));
    if joliet {
        // UCS-2 level 3.
        d[88..91].copy_from_slice(b"%/E");
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(10));
    d[140..144].copy_from_slice(&path_l.to_le_bytes());
    d[148..152].copy_from_slice(&path_m.to_be_bytes());
    let root = dir_record(root, SECTOR as u32, true, &[0]);
    d[156..156 + root.len()].copy_from_slice(&root);
    for (at, len) in [(190, 128), (318, 128), (446, 128), (574, 128)] {
        d[at..at + len].copy_from_slice(&text("", len));
    }
    for (at, len) in [(702, 37), (739, 37), (776, 37)] {
        d[at..at + len].copy_from_slice(&text("", len));
    }
    for at in [813, 830, 847, 864] {
        d[at..at + 16].copy_from_slice(b"2000010100000000");
    }
    d[881] = 1;
    d
}

fn path_table(root: u32, big_endian: bool) -> Vec<u8> {
    let mut t = vec![0u8; SECTOR];
    t[0] = 1;
    let lba = if big_endian {
        root.to_be_bytes()
    } else {
        root.to_le_bytes()
    };
    t[2..6].copy_from_slice(&lba);
    let parent = if big_endian {
        1u16.to_be_bytes()
    } else {
        1u16.to_le_bytes()
    };
    t[6..8].copy_from_slice(&parent);
    t
}

/// An ISO image labelled `label` holding `files` (name, bytes) in its root.
pub fn build(label: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut extents = Vec::new();
    let mut next = FIRST_FILE;
    for (_, data) in files {
        extents.push(next);
        next += data.len().div_ceil(SECTOR).max(1) as u32;
    }
    let sectors = next;
    let root_dir = |joliet: bool, own: u32| {
        let mut d = Vec::new();
        d.extend(dir_record(own, SECTOR as u32, true, &[0]));
        d.extend(dir_record(own, SECTOR as u32, true, &[1]));
        for ((name, data), extent) in files.iter().zip(&extents) {
            let id = if joliet {
                ucs2(name)
            } else {
                primary_name(name)
            };
            d.extend(dir_record(*extent, data.len() as u32, false, &id));
        }
        d.resize(SECTOR, 0);
        d
    };
    let mut iso = vec![0u8; 16 * SECTOR];
    iso.extend(volume_descriptor(false, label, sectors, 23, 19, 20));
    iso.extend(volume_descriptor(true, label, sectors, 24, 21, 22));
    let mut term = vec![0u8; SECTOR];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    iso.extend(term);
    iso.extend(path_table(23, false));
    iso.extend(path_table(23, true));
    iso.extend(path_table(24, false));
    iso.extend(path_table(24, true));
    iso.extend(root_dir(false, 23));
    iso.extend(root_dir(true, 24));
    for (_, data) in files {
        let start = iso.len();
        iso.extend_from_slice(data);
        iso.resize(start + data.len().div_ceil(SECTOR).max(1) * SECTOR, 0);
    }
    iso
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_names_are_8_3() {
        assert_eq!(primary_name("user-data"), b"USER_DAT.;1");
        assert_eq!(primary_name("meta-data"), b"META_DAT.;1");
        assert_eq!(primary_name("a.json"), b"A.JSO;1");
    }

    #[test]
    fn layout_and_descriptors() {
        let iso = build(
            "cidata",
            &[("user-data", b"hello"), ("meta-data", &[1u8; 3000])],
        );
        assert_eq!(iso.len(), (FIRST_FILE as usize + 1 + 2) * SECTOR);
        assert_eq!(&iso[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(&iso[16 * SECTOR + 40..16 * SECTOR + 46], b"cidata");
        assert_eq!(iso[17 * SECTOR], 2);
        assert_eq!(&iso[17 * SECTOR + 88..17 * SECTOR + 91], b"%/E");
        assert_eq!(iso[18 * SECTOR], 255);
        assert_eq!(&iso[25 * SECTOR..25 * SECTOR + 5], b"hello");
    }
}
