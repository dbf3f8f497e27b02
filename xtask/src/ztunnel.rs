//! ztunnel, Istio ambient's node proxy, as a real peer for weir's tests:
//! built once per machine from the shared reference source
//! (`../shared/reference/peers/ztunnel/`, see its README) into a cache
//! outside the checkout, `~/.cache/weir/ztunnel/<commit>/`:
//!
//! - `ztunnel/`: the unpacked source (patched with
//!   `harness-ip_forward.patch`), its build in `ztunnel/out/rust`;
//! - `brp.git`, `gitconfig`: the one git dependency cargo resolves, served
//!   from the bare repository in the reference directory;
//! - `bin/ztunnel`: the proxy binary (a debug build with the fake CA that
//!   `FAKE_CA=true` needs), copied out of the build of ztunnel's
//!   `namespaced` test suite, which builds both at once (~6 min cold on
//!   2 cores, 3.2 GB; then nothing).
//!
//! The kernel tests find the binary through `WEIR_ZTUNNEL_BIN` (set by
//! `cargo xtask test`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::Cmd;
use crate::host;

/// The ztunnel commit of the shared source (its README says which).
pub const COMMIT: &str = "62d826530e5ce85764e309170205b293efcbc80b";
/// The variable that gives the tests the ztunnel binary.
pub const BIN_ENV: &str = "WEIR_ZTUNNEL_BIN";

/// `$WEIR_ZTUNNEL_CACHE`, else `$XDG_CACHE_HOME/weir/ztunnel/<commit:8>`,
/// else `~/.cache/weir/ztunnel/<commit:8>`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WEIR_ZTUNNEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("weir/ztunnel").join(&COMMIT[..8])
}

/// The shared reference directory with ztunnel's source.
pub fn peer_dir(root: &Path) -> PathBuf {
    root.join("../shared/reference/peers/ztunnel")
}

/// The unpacked, patched source (unpacked on first use): `<cache>/ztunnel`.
pub fn ensure_source(root: &Path) -> Result<PathBuf> {
    let cache = cache_dir();
    let src = cache.join("ztunnel");
    if src.join("Cargo.toml").is_file() {
        return Ok(src);
    }
    let peer = peer_dir(root);
    let tarball = peer.join("ztunnel-src.tar.gz");
    if !tarball.is_file() {
        bail!(
            "{} not found: ztunnel's source comes from the shared reference directory beside the checkout (../shared/reference/peers/ztunnel)",
            tarball.display()
        );
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // Unpacked beside, then renamed: an interrupted unpack is redone.
    let tmp = cache.join("ztunnel.unpacking");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    Cmd::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tmp)
        .run()?;
    Cmd::new("patch")
        .args(["-p1", "-i"])
        .arg(peer.join("harness-ip_forward.patch"))
        .dir(tmp.join("ztunnel"))
        .run()?;
    let brp = cache.join("brp.git");
    if !brp.join("HEAD").is_file() {
        let _ = std::fs::remove_dir_all(&brp);
        std::fs::create_dir_all(&brp)?;
        Cmd::new("tar")
            .arg("-xzf")
            .arg(peer.join("boring-rustls-provider.git.tar.gz"))
            .arg("-C")
            .arg(&brp)
            .run()?;
    }
    std::fs::write(
        cache.join("gitconfig"),
        format!(
            "[url \"file://{}\"]\n\tinsteadOf = https://github.com/janrueth/boring-rustls-provider\n",
            brp.display()
        ),
    )?;
    std::fs::rename(tmp.join("ztunnel"), &src)
        .with_context(|| format!("moving the unpacked source to {}", src.display()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(src)
}

/// Builds ztunnel's `namespaced` test suite (and with it the `ztunnel`
/// binary) unless built already; returns the source directory, whose
/// `out/rust/debug/deps/namespaced-*` is the suite.
pub fn ensure_namespaced_build(root: &Path) -> Result<PathBuf> {
    let src = ensure_source(root)?;
    // protoc, and the well-known types ztunnel's protos import
    // (google/protobuf/*.proto, from libprotobuf-dev).
    if host::find_admin_program("protoc").is_none()
        || !Path::new("/usr/include/google/protobuf/empty.proto").is_file()
    {
        crate::toolchain::apt_install(&["protobuf-compiler", "libprotobuf-dev"])?;
    }
    let cache = cache_dir();
    println!(
        "ztunnel: building its namespaced tests and binary in {} (once per machine; ~6 min cold)",
        src.display()
    );
    Cmd::new(host::cargo())
        .args(["test", "--test", "namespaced", "--no-run"])
        .env("GIT_CONFIG_GLOBAL", cache.join("gitconfig"))
        .env("CARGO_NET_GIT_FETCH_WITH_CLI", "true")
        // weir's own build settings must not leak into ztunnel's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .dir(&src)
        .run()
        .context("building ztunnel (its source: ../shared/reference/peers/ztunnel/README.md)")?;
    Ok(src)
}

/// The ztunnel binary, `<cache>/bin/ztunnel`, built first when missing.
pub fn ensure_ztunnel_binary(root: &Path) -> Result<PathBuf> {
    let bin = cache_dir().join("bin/ztunnel");
    if host::is_executable(&bin) {
        return Ok(bin);
    }
    let src = ensure_namespaced_build(root)?;
    let built = src.join("out/rust/debug/ztunnel");
    if !built.is_file() {
        bail!("{} missing after ztunnel's build", built.display());
    }
    let dir = bin.parent().context("bin/ztunnel has a parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("ztunnel.tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &bin)?;
    println!("ztunnel: {}", bin.display());
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_the_one_of_the_shared_source() {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/peers/ztunnel/README.md");
        let Ok(text) = std::fs::read_to_string(&readme) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is missing under CI",
                readme.display()
            );
            return;
        };
        assert!(
            text.contains(COMMIT),
            "{} names another commit",
            readme.display()
        );
        assert!(
            cache_dir().ends_with(&COMMIT[..8]) || std::env::var_os("WEIR_ZTUNNEL_CACHE").is_some()
        );
    }
}
