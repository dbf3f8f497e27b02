//! OCI image archives written directly, with no daemon and no registry:
//! `cargo xtask image` (weir's own image) and the small images the
//! real-runtime test (`tests/tests/cri_node.rs`) runs its pods from.
//!
//! An image here is one layer holding exactly the files given: the
//! executables, the shared libraries they link (found with `ldd`, taken
//! from the build machine's Debian packages, whose names and versions are
//! recorded in the image), and a few small files. See docs/image.md for
//! why, and for how to load and publish the archive.
//!
//! The archive is the OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) in a tar: `ctr images import`, `podman load` and
//! `skopeo copy oci-archive:…` read it. It is reproducible: every
//! timestamp is `SOURCE_DATE_EPOCH` (else the last commit's time), owners
//! are 0:0, entries are sorted, gzip has no name and no time, JSON keys are
//! sorted; the same files give the same digest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
    Sha256Digest,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::cmd::Cmd;

/// Where weir's image is published; the tag is the workspace version.
pub const REPOSITORY: &str = "ghcr.io/weir-dev/weir";

/// containerd's annotation for the full image name in an index (what
/// `ctr images import` names the image).
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// What one entry of the image's file system holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A regular file with these bytes.
    File(Vec<u8>),
    /// A directory.
    Dir,
}

/// One entry of the image's single layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path in the image (`/usr/local/bin/weir`).
    pub path: String,
    /// Permission bits (0o755, 0o644, ...).
    pub mode: u32,
    /// What it holds.
    pub content: Content,
}

impl Entry {
    /// A regular file read from `source` (following symlinks), keeping
    /// its permission bits.
    pub fn copy(path: &str, source: &Path) -> Result<Entry> {
        use std::os::unix::fs::PermissionsExt;
        let data =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let mode = std::fs::metadata(source)
            .with_context(|| format!("reading {}", source.display()))?
            .permissions()
            .mode()
            & 0o7777;
        Ok(Entry {
            path: path.to_owned(),
            mode,
            content: Content::File(data),
        })
    }

    /// A regular file with `data`.
    pub fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry {
            path: path.to_owned(),
            mode,
            content: Content::File(data.into()),
        }
    }

    /// A directory.
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry {
            path: path.to_owned(),
            mode,
            content: Content::Dir,
        }
    }
}

/// Everything an image is made of.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Full name with tag (`ghcr.io/weir-dev/weir:0.1.0`).
    pub name: String,
    /// The layer's files (parent directories are added).
    pub entries: Vec<Entry>,
    /// The container's entrypoint.
    pub entrypoint: Vec<String>,
    /// Its default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Image labels (`org.opencontainers.image.*`).
    pub labels: BTreeMap<String, String>,
    /// Every timestamp in the image, seconds since the epoch.
    pub epoch: i64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The manifest's digest (`sha256:…`): the image's identity, as
    /// registries and `ctr images ls` show it.
    pub manifest_digest: String,
    /// Size of the compressed layer in bytes.
    pub layer_size: u64,
}

/// Writes `spec` as an OCI image layout in a tar at `out`.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<Written> {
    let (tag, _) = split_name(&spec.name)?;
    let created = jiff::Timestamp::from_second(spec.epoch)
        .context("SOURCE_DATE_EPOCH out of range")?
        .to_string();

    let layer_tar = layer_tar(&spec.entries, spec.epoch)?;
    let diff_id = sha256(&layer_tar);
    let mut layer_gz = Vec::new();
    {
        // No file name and mtime 0 in the gzip header.
        let mut gz = GzBuilder::new().write(&mut layer_gz, Compression::best());
        gz.write_all(&layer_tar)?;
        gz.finish()?;
    }

    let config = ImageConfigurationBuilder::default()
        .architecture(oci_arch()?)
        .os(Os::Linux)
        .created(created.clone())
        .config(
            ConfigBuilder::default()
                .entrypoint(spec.entrypoint.clone())
                .cmd(spec.cmd.clone())
                .env(spec.env.clone())
                .labels(
                    spec.labels
                        .clone()
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .working_dir("/".to_owned())
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_owned())
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created)
                .created_by("cargo xtask image".to_owned())
                .build()?,
        ])
        .build()?;
    let config_json = canonical_json(&serde_json::to_value(&config)?)?;

    let layer_desc = descriptor(MediaType::ImageLayerGzip, &layer_gz, None)?;
    let config_desc = descriptor(MediaType::ImageConfig, &config_json, None)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .build()?;
    let manifest_json = canonical_json(&serde_json::to_value(&manifest)?)?;
    let annotations = BTreeMap::from([
        (ANNOTATION_CONTAINERD_NAME.to_owned(), spec.name.clone()),
        // The OCI annotation is the tag alone, as containerd writes it.
        (
            oci_spec::image::ANNOTATION_REF_NAME.to_owned(),
            tag.to_owned(),
        ),
    ]);
    let mut manifest_desc =
        descriptor(MediaType::ImageManifest, &manifest_json, Some(annotations))?;
    manifest_desc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(oci_arch()?)
            .os(Os::Linux)
            .build()?,
    ));
    let manifest_digest = manifest_desc.digest().to_string();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let index_json = canonical_json(&serde_json::to_value(&index)?)?;
    let layout = canonical_json(&serde_json::json!({"imageLayoutVersion": "1.0.0"}))?;

    let mut files: Vec<Entry> = vec![
        Entry::file("oci-layout", 0o644, layout),
        Entry::file("index.json", 0o644, index_json),
        Entry::dir("blobs", 0o755),
        Entry::dir("blobs/sha256", 0o755),
    ];
    for blob in [&layer_gz, &config_json, &manifest_json] {
        files.push(Entry::file(
            &format!("blobs/sha256/{}", sha256(blob)),
            0o644,
            blob.clone(),
        ));
    }
    let archive = tar_of(&files, spec.epoch)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, archive).with_context(|| format!("writing {}", out.display()))?;
    Ok(Written {
        manifest_digest,
        layer_size: layer_gz.len() as u64,
    })
}

/// `name:tag` -> (`tag`, `name`).
fn split_name(name: &str) -> Result<(&str, &str)> {
    let (repo, tag) = name
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/') && !tag.is_empty())
        .with_context(|| format!("image name {name:?} has no tag (want REPOSITORY:TAG)"))?;
    Ok((tag, repo))
}

fn oci_arch() -> Result<Arch> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => bail!("no OCI architecture name known for {other}"),
    })
}

fn descriptor(
    media_type: MediaType,
    blob: &[u8],
    annotations: Option<BTreeMap<String, String>>,
) -> Result<Descriptor> {
    let digest: Sha256Digest = sha256(blob).parse()?;
    let mut builder = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(blob.len() as u64);
    if let Some(a) = annotations {
        builder = builder.annotations(a.into_iter().collect::<std::collections::HashMap<_, _>>());
    }
    Ok(builder.build()?)
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON with every object's keys sorted (oci-spec keeps labels and
/// annotations in hash maps, whose order changes from run to run).
fn canonical_json(value: &Value) -> Result<Vec<u8>> {
    fn sort(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let sorted: BTreeMap<&String, Value> =
                    map.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    Ok(serde_json::to_vec(&sort(value))?)
}

/// The layer: `entries` plus their parent directories, sorted by path,
/// owned by 0:0, all stamped `epoch`.
fn layer_tar(entries: &[Entry], epoch: i64) -> Result<Vec<u8>> {
    let mut all: BTreeMap<String, Entry> = BTreeMap::new();
    for entry in entries {
        let path = entry.path.trim_start_matches('/');
        ensure!(
            entry.path.starts_with('/') && !path.is_empty() && !path.split('/').any(|c| c == ".."),
            "image path {:?} must be absolute, without `..`",
            entry.path
        );
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            let name = dir.to_string_lossy().into_owned();
            all.entry(name.clone())
                .or_insert_with(|| Entry::dir(&name, 0o755));
            parent = dir.parent();
        }
        if let Some(old) = all.insert(path.to_owned(), entry.clone())
            && old.content != Content::Dir
            && old != *entry
        {
            bail!("image path {} is given twice, differently", entry.path);
        }
    }
    let entries: Vec<Entry> = all
        .into_iter()
        .map(|(path, mut e)| {
            e.path = path;
            e
        })
        .collect();
    tar_of(&entries, epoch)
}

/// A tar of `entries` in the given order (paths relative, no leading `/`).
fn tar_of(entries: &[Entry], epoch: i64) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(u64::try_from(epoch).unwrap_or(0));
        header.set_mode(entry.mode);
        let path = entry.path.trim_start_matches('/');
        match &entry.content {
            Content::File(data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, data.as_slice())?;
            }
            Content::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

/// `SOURCE_DATE_EPOCH`, else the time of the commit checked out at
/// `root`, else 0.
pub fn source_date_epoch(root: &Path) -> Result<i64> {
    if let Some(value) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let value = value.to_string_lossy();
        return value.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds since 1970")
        });
    }
    Ok(Cmd::new("git")
        .args(["log", "-1", "--format=%ct"])
        .dir(root)
        .read()
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// A shared library an executable links, and the Debian package it came
/// from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Library {
    /// The path the dynamic loader opens (as `ldd` prints it).
    pub path: PathBuf,
    /// `package version` from dpkg, e.g. `libc6:amd64 2.36-9+deb12u14`.
    pub package: String,
}

/// The shared libraries (and the dynamic loader) each of `executables`
/// links, from `ldd`, with their Debian packages.
pub fn libraries(executables: &[&Path]) -> Result<Vec<Library>> {
    let mut paths = std::collections::BTreeSet::new();
    for exe in executables {
        let out = Cmd::new("ldd")
            .arg(exe)
            .read()
            .with_context(|| format!("listing the libraries {} links (ldd)", exe.display()))?;
        paths.extend(parse_ldd(&out));
    }
    paths
        .into_iter()
        .map(|path| {
            let package = debian_package(&path)?;
            Ok(Library { path, package })
        })
        .collect()
}

/// The library paths in `ldd` output (`libc.so.6 => /lib/…/libc.so.6
/// (0x…)` and the loader's own line `/lib64/ld-linux-x86-64.so.2 (0x…)`);
/// the kernel's vDSO has no file.
fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `package version` of the Debian package that installed `path`. Merged
/// /usr systems install /lib/… files whose dpkg record may say /usr/lib/…
/// (or the other way round), so both spellings are asked.
fn debian_package(path: &Path) -> Result<String> {
    let real =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut candidates = vec![path.to_path_buf(), real.clone()];
    for p in [path, real.as_path()] {
        let s = p.to_string_lossy();
        if let Some(rest) = s.strip_prefix("/usr") {
            candidates.push(PathBuf::from(rest));
        } else {
            candidates.push(PathBuf::from(format!("/usr{s}")));
        }
    }
    for candidate in &candidates {
        let Ok(out) = Cmd::new("dpkg-query").arg("-S").arg(candidate).read() else {
            continue;
        };
        let Some(package) = out
            .lines()
            .next()
            .and_then(|l| l.split_once(':').map(|(p, _)| p.trim()))
        else {
            continue;
        };
        // `libc6:amd64, libc6-dev:amd64: /path` lists every owner; the
        // first is enough.
        let package = package.split(',').next().unwrap_or(package).trim();
        let version = Cmd::new("dpkg-query")
            .args(["-W", "-f=${Version}", package])
            .read()
            .with_context(|| format!("version of the Debian package {package}"))?;
        return Ok(format!("{package} {version}"));
    }
    bail!(
        "{} is not from a Debian package (dpkg-query -S knows no owner): the images are \
         built from a Debian system's libraries; build on Debian 12 (bookworm)",
        path.display()
    )
}

/// The entries for `executables` (image path, host path) and every
/// library they link, plus `/usr/share/weir/base-packages.txt` listing
/// the libraries' Debian packages and versions.
pub fn binaries_with_libraries(executables: &[(&str, &Path)]) -> Result<Vec<Entry>> {
    let hosts: Vec<&Path> = executables.iter().map(|(_, host)| *host).collect();
    let libraries = libraries(&hosts)?;
    let mut entries = Vec::new();
    for (image_path, host) in executables {
        entries.push(Entry::copy(image_path, host)?);
    }
    let mut record = String::from(
        "# The shared libraries in this image, each copied from a Debian package \
         of the machine that built it.\n",
    );
    for lib in &libraries {
        let path = lib.path.to_string_lossy();
        entries.push(Entry::copy(&path, &lib.path)?);
        record.push_str(&format!("{path} {}\n", lib.package));
    }
    entries.push(Entry::file(
        "/usr/share/weir/base-packages.txt",
        0o644,
        record,
    ));
    Ok(entries)
}

/// Files every image gets: a root-only /tmp is not needed (the agent's
/// root file system is read-only), but name lookups read these.
pub fn base_files() -> Vec<Entry> {
    vec![
        Entry::file(
            "/etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/sbin/nologin\n",
        ),
        Entry::file("/etc/group", 0o644, "root:x:0:\n"),
        Entry::file("/etc/nsswitch.conf", 0o644, "hosts: files dns\n"),
        Entry::dir("/tmp", 0o1777),
        Entry::dir("/root", 0o700),
    ]
}

/// Where `cargo xtask image` writes weir's archive.
pub fn default_archive(root: &Path) -> PathBuf {
    crate::build::host_target_dir(root)
        .join("image")
        .join(format!("weir-{}.oci.tar", env!("CARGO_PKG_VERSION")))
}

/// Where the real-runtime test's images go.
pub fn test_images_dir(root: &Path) -> PathBuf {
    crate::build::host_target_dir(root)
        .join("image")
        .join("test")
}

/// Debian's CA bundle: the agent's Kubernetes client (rustls) refuses to
/// start without system roots, even when the cluster's CA is given. The
/// file is generated by `update-ca-certificates` from the
/// `ca-certificates` package, whose version the image records in a label.
fn ca_bundle() -> Result<Entry> {
    let path = Path::new(CA_BUNDLE);
    ensure!(
        path.is_file(),
        "{CA_BUNDLE} not found: install the Debian package ca-certificates"
    );
    let mut entry = Entry::copy(CA_BUNDLE, path)?;
    entry.mode = 0o644;
    Ok(entry)
}

const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn package_version(package: &str) -> Result<String> {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .read()
        .with_context(|| format!("version of the Debian package {package}"))
}

/// weir's image name: [`REPOSITORY`] tagged with the workspace version.
pub fn weir_image_name() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// weir's image: `weir` and `weir-cni` (from `bin_dir`, a release build
/// with the kernel object embedded) in /usr/local/bin, `bpftool` for
/// operators (`kubectl exec … -- bpftool prog show`), and the libraries
/// they link.
pub fn weir_image(root: &Path, bin_dir: &Path, out: &Path) -> Result<Written> {
    let weir = bin_dir.join("weir");
    let cni = bin_dir.join("weir-cni");
    for bin in [&weir, &cni] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    let bpftool = crate::host::find_admin_program("bpftool")
        .context("bpftool not found (Debian package bpftool; `cargo xtask setup` installs it)")?;
    let mut entries = base_files();
    entries.extend(binaries_with_libraries(&[
        ("/usr/local/bin/weir", &weir),
        ("/usr/local/bin/weir-cni", &cni),
        ("/usr/sbin/bpftool", &bpftool),
    ])?);
    entries.push(ca_bundle()?);
    let version = env!("CARGO_PKG_VERSION");
    let spec = ImageSpec {
        name: weir_image_name(),
        entries,
        entrypoint: vec!["/usr/local/bin/weir".into()],
        cmd: vec!["run".into(), "--kubernetes".into()],
        env: vec!["PATH=/usr/local/bin:/usr/sbin:/usr/bin".into()],
        labels: BTreeMap::from([
            ("org.opencontainers.image.title".into(), "weir".into()),
            (
                "org.opencontainers.image.description".into(),
                "weir node agent and weir-cni: eBPF traffic capture for service meshes".into(),
            ),
            ("org.opencontainers.image.version".into(), version.into()),
            (
                "org.opencontainers.image.licenses".into(),
                "Apache-2.0".into(),
            ),
            (
                "org.opencontainers.image.revision".into(),
                git_revision(root).unwrap_or_default(),
            ),
            (
                "dev.weir.ca-certificates".into(),
                format!("ca-certificates {}", package_version("ca-certificates")?),
            ),
        ]),
        epoch: source_date_epoch(root)?,
    };
    write_archive(&spec, out)
}

fn git_revision(root: &Path) -> Option<String> {
    Cmd::new("git")
        .args(["rev-parse", "HEAD"])
        .dir(root)
        .read()
        .ok()
}

/// The images `tests/tests/cri_node.rs` runs its pods from (nothing can be
/// pulled there): `weir-test/pause:1` (the pod sandbox: `weir-testkit
/// pause`) and `weir-test/tools:1` (the pods' containers: the testkit's
/// sidecar, echo server and client), in `out_dir`.
pub fn test_images(root: &Path, bin_dir: &Path, out_dir: &Path) -> Result<()> {
    let testkit = bin_dir.join("weir-testkit");
    ensure!(testkit.is_file(), "{} was not built", testkit.display());
    let epoch = source_date_epoch(root)?;
    for (file, name, entrypoint) in [
        (
            "pause.oci.tar",
            "weir-test.invalid/pause:1",
            vec!["/usr/local/bin/weir-testkit".to_owned(), "pause".to_owned()],
        ),
        (
            "tools.oci.tar",
            "weir-test.invalid/tools:1",
            vec!["/usr/local/bin/weir-testkit".to_owned()],
        ),
    ] {
        let mut entries = base_files();
        entries.extend(binaries_with_libraries(&[(
            "/usr/local/bin/weir-testkit",
            &testkit,
        )])?);
        let spec = ImageSpec {
            name: name.into(),
            entries,
            entrypoint,
            cmd: Vec::new(),
            env: vec!["PATH=/usr/local/bin:/usr/bin".into()],
            labels: BTreeMap::new(),
            epoch,
        };
        let written = write_archive(&spec, &out_dir.join(file))?;
        println!(
            "weir image: {name} {} -> {}",
            written.manifest_digest,
            out_dir.join(file).display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entries: Vec<Entry>, epoch: i64) -> ImageSpec {
        ImageSpec {
            name: "example.invalid/weir-test:1.2.3".into(),
            entries,
            entrypoint: vec!["/usr/local/bin/tool".into()],
            cmd: vec!["run".into()],
            env: vec!["A=b".into()],
            labels: BTreeMap::from([
                ("z".into(), "1".into()),
                ("a".into(), "2".into()),
                ("m".into(), "3".into()),
            ]),
            epoch,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_tar(data: &[u8]) -> BTreeMap<String, (tar::EntryType, u64, u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(data);
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut body).unwrap();
            out.insert(
                entry.path().unwrap().to_string_lossy().into_owned(),
                (
                    header.entry_type(),
                    header.mtime().unwrap(),
                    header.uid().unwrap() as u32,
                    body,
                ),
            );
        }
        out
    }

    #[test]
    fn same_inputs_give_the_same_digest_whatever_the_files_times() {
        let dir = scratch("repro");
        let tool = dir.join("tool");
        std::fs::write(&tool, b"#!/bin/true\n").unwrap();
        let first = write_archive(
            &spec(
                vec![Entry::copy("/usr/local/bin/tool", &tool).unwrap()],
                1_700_000_000,
            ),
            &dir.join("a.tar"),
        )
        .unwrap();
        // The same content, written again later (another mtime, another
        // inode): the same image, byte for byte.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::remove_file(&tool).unwrap();
        std::fs::write(&tool, b"#!/bin/true\n").unwrap();
        let second = write_archive(
            &spec(
                vec![Entry::copy("/usr/local/bin/tool", &tool).unwrap()],
                1_700_000_000,
            ),
            &dir.join("b.tar"),
        )
        .unwrap();
        assert_eq!(first, second);
        assert_eq!(
            std::fs::read(dir.join("a.tar")).unwrap(),
            std::fs::read(dir.join("b.tar")).unwrap()
        );
        // Other bytes, or another SOURCE_DATE_EPOCH: another image.
        std::fs::write(&tool, b"#!/bin/false\n").unwrap();
        let changed = write_archive(
            &spec(
                vec![Entry::copy("/usr/local/bin/tool", &tool).unwrap()],
                1_700_000_000,
            ),
            &dir.join("c.tar"),
        )
        .unwrap();
        assert_ne!(changed.manifest_digest, first.manifest_digest);
        std::fs::write(&tool, b"#!/bin/true\n").unwrap();
        let later = write_archive(
            &spec(
                vec![Entry::copy("/usr/local/bin/tool", &tool).unwrap()],
                1_700_000_001,
            ),
            &dir.join("d.tar"),
        )
        .unwrap();
        assert_ne!(later.manifest_digest, first.manifest_digest);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn archive_is_an_oci_layout_whose_digests_match() {
        let dir = scratch("layout");
        let out = dir.join("img.tar");
        let written = write_archive(
            &spec(
                vec![
                    Entry::file("/usr/local/bin/tool", 0o755, "x"),
                    Entry::file("/etc/a.conf", 0o644, "y"),
                ],
                42,
            ),
            &out,
        )
        .unwrap();
        let outer = read_tar(&std::fs::read(&out).unwrap());
        let names: Vec<&str> = outer.keys().map(String::as_str).collect();
        assert!(names.contains(&"oci-layout") && names.contains(&"index.json"));
        // Every blob is named by its own digest.
        for (name, (_, mtime, uid, body)) in &outer {
            assert_eq!((*mtime, *uid), (42, 0), "{name}");
            if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256(body), hex);
            }
        }
        let blob = |digest: &str| {
            let hex = digest.strip_prefix("sha256:").unwrap();
            outer[&format!("blobs/sha256/{hex}")].3.clone()
        };
        let index: Value = serde_json::from_slice(&outer["index.json"].3).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], written.manifest_digest.as_str());
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "example.invalid/weir-test:1.2.3"
        );
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            "1.2.3"
        );
        let manifest: Value = serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        let config: Value =
            serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/tool");
        assert_eq!(config["created"], "1970-01-01T00:00:42Z");
        // The layer: gzip of a tar whose SHA-256 is the config's diff_id,
        // with the parent directories added, sorted, 0:0.
        let gz = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        let mut layer = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut layer)
            .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256(&layer))
        );
        let files = read_tar(&layer);
        let paths: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "etc/",
                "etc/a.conf",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/tool"
            ]
        );
        assert_eq!(files["usr/local/bin/tool"].3, b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn names_need_a_tag() {
        assert_eq!(
            split_name("ghcr.io/a/b:1.0").unwrap(),
            ("1.0", "ghcr.io/a/b")
        );
        assert!(split_name("localhost:5000/a/b").is_err());
        assert!(split_name("b").is_err());
    }
}
