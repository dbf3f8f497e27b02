//! Just enough of the bpf(2) system call to count what weir left in the
//! kernel: entries of its pinned maps, and BPF links.
//!
//! `weir_map_entries` on `/metrics` covers only the per-pod maps and needs
//! a running agent; this reads every pinned map (LISTENERS, PENDING_FLOWS,
//! LISTEN_PORTS, POD_META too) straight from the bpffs, with or without an
//! agent.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// Map types whose entries can be listed key by key (hash maps, LRU hash
/// maps, LPM tries, sockhash). Arrays always hold `max_entries`; socket
/// storage and ring buffers cannot be listed.
const KEYED_MAP_TYPES: &[u32] = &[1, 5, 9, 10, 11, 13, 18, 25];

/// `BPF_LINK_TYPE_NETNS`: an `sk_lookup` (or flow dissector) link.
pub const LINK_TYPE_NETNS: u32 = 5;

/// The `bpf_attr` union, as a zeroed buffer large enough for the commands
/// used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-padded bpf_attr of the size passed;
    // every pointer stored in it refers to a live buffer of the size the
    // command expects (see the callers).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut a = Attr::new();
    a.put_u64(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(fd_from)
}

fn info_by_fd(fd: &OwnedFd, info: &mut [u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut a = Attr::new();
    a.put_u32(0, fd.as_raw_fd() as u32);
    a.put_u32(4, info.len() as u32);
    a.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(|_| ())
}

/// What `bpf_map_info` says about a map.
#[derive(Clone, Debug)]
pub struct MapInfo {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

/// The map's type, sizes and capacity.
pub fn map_info(fd: &OwnedFd) -> io::Result<MapInfo> {
    let mut info = [0u8; 96];
    info_by_fd(fd, &mut info)?;
    let word = |off: usize| u32::from_ne_bytes(info[off..off + 4].try_into().expect("4 bytes"));
    Ok(MapInfo {
        map_type: word(0),
        key_size: word(8),
        value_size: word(12),
        max_entries: word(16),
    })
}

/// Every key of a keyed map, in the kernel's iteration order.
pub fn map_keys(fd: &OwnedFd, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let mut keys = Vec::new();
    let mut next = vec![0u8; key_size.max(1)];
    let mut prev: Option<Vec<u8>> = None;
    loop {
        let mut a = Attr::new();
        a.put_u32(0, fd.as_raw_fd() as u32);
        a.put_u64(8, prev.as_ref().map_or(0, |k| k.as_ptr() as u64));
        a.put_u64(16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        keys.push(next.clone());
        prev = Some(next.clone());
        if keys.len() > 10_000_000 {
            return Err(io::Error::other("map iteration does not end"));
        }
    }
}

/// The value stored under `key` (non-per-CPU maps).
pub fn map_lookup(fd: &OwnedFd, key: &[u8], value_size: usize) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut value = vec![0u8; value_size];
    let mut a = Attr::new();
    a.put_u32(0, fd.as_raw_fd() as u32);
    a.put_u64(8, key.as_ptr() as u64);
    a.put_u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
    Ok(value)
}

/// One map's occupancy.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Occupancy {
    /// Entries now.
    pub entries: usize,
    /// Capacity.
    pub capacity: u32,
}

/// Entries of every keyed map pinned under `<bpffs>/weir/maps`, by name.
pub fn occupancy(bpffs: &Path) -> Result<BTreeMap<String, Occupancy>> {
    let dir = bpffs.join("weir/maps");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let fd = obj_get(&entry.path()).with_context(|| format!("opening pinned map {name}"))?;
        let info = map_info(&fd).with_context(|| format!("map info of {name}"))?;
        if name == "LISTEN_PORTS" {
            // A bitmap (an array): its entries are the ports it holds.
            let mut ports = 0usize;
            for word in 0..info.max_entries {
                let v = map_lookup(&fd, &word.to_ne_bytes(), info.value_size as usize)
                    .with_context(|| format!("reading {name}[{word}]"))?;
                ports += v.iter().map(|b| b.count_ones() as usize).sum::<usize>();
            }
            out.insert(
                name,
                Occupancy {
                    entries: ports,
                    capacity: info.max_entries * 64,
                },
            );
            continue;
        }
        if !KEYED_MAP_TYPES.contains(&info.map_type) {
            continue;
        }
        let keys = map_keys(&fd, info.key_size as usize)
            .with_context(|| format!("listing the keys of {name}"))?;
        out.insert(
            name,
            Occupancy {
                entries: keys.len(),
                capacity: info.max_entries,
            },
        );
    }
    Ok(out)
}

/// Entries of one pinned map.
pub fn count_entries(bpffs: &Path, map: &str) -> Result<usize> {
    let path = bpffs.join("weir/maps").join(map);
    let fd = obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
    let info = map_info(&fd)?;
    Ok(map_keys(&fd, info.key_size as usize)?.len())
}

/// `POD_ADDRS`: pod address (IPv4 as IPv4-mapped IPv6) -> netns cookie.
pub fn pod_addrs(bpffs: &Path) -> Result<BTreeMap<std::net::IpAddr, u64>> {
    let path = bpffs.join("weir/maps/POD_ADDRS");
    let fd = obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
    let info = map_info(&fd)?;
    let mut out = BTreeMap::new();
    for key in map_keys(&fd, info.key_size as usize)? {
        let Ok(value) = map_lookup(&fd, &key, info.value_size as usize) else {
            continue; // removed meanwhile
        };
        let octets: [u8; 16] = key.as_slice().try_into().context("POD_ADDRS key size")?;
        let v6 = std::net::Ipv6Addr::from(octets);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        };
        let cookie = u64::from_ne_bytes(value[..8].try_into().context("POD_ADDRS value")?);
        out.insert(ip, cookie);
    }
    Ok(out)
}

/// A BPF link as `bpf_link_info` describes it.
#[derive(Clone, Debug)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The program's id.
    pub prog_id: u32,
    /// For netns links: the namespace's inode (0 once it is gone).
    pub netns_ino: u32,
}

fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    let mut info = [0u8; 64];
    info_by_fd(fd, &mut info)?;
    let word = |off: usize| u32::from_ne_bytes(info[off..off + 4].try_into().expect("4 bytes"));
    Ok(LinkInfo {
        link_type: word(0),
        prog_id: word(8),
        netns_ino: word(16),
    })
}

/// The link pinned at `path`.
pub fn pinned_link(path: &Path) -> Result<LinkInfo> {
    let fd = obj_get(path).with_context(|| format!("opening pinned link {}", path.display()))?;
    link_info(&fd).with_context(|| format!("link info of {}", path.display()))
}

/// Every BPF link of the machine.
pub fn all_links() -> Result<Vec<LinkInfo>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut a = Attr::new();
        a.put_u32(0, id);
        match bpf(BPF_LINK_GET_NEXT_ID, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e).context("BPF_LINK_GET_NEXT_ID"),
        }
        id = a.u32_at(4);
        let mut g = Attr::new();
        g.put_u32(0, id);
        let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut g) {
            Ok(rc) => fd_from(rc),
            Err(_) => continue, // freed meanwhile
        };
        if let Ok(info) = link_info(&fd) {
            out.push(info);
        }
    }
}
