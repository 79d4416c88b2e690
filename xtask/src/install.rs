//! `cargo xtask install`: `lb` as a service on this host (or under a staging directory).

use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the shipped unit expects the binary; replaced by the prefix's.
const UNIT_BINARY: &str = "/usr/local/sbin/lb";

pub fn run(root: &Path, binary: &Path, prefix: &Path, destdir: &Path) -> Result<()> {
    if !binary.is_file() {
        bail!("{}: no such binary", binary.display());
    }
    if !prefix.is_absolute() {
        bail!("--prefix {}: must be an absolute path", prefix.display());
    }
    let staged = |path: &Path| -> PathBuf { destdir.join(path.strip_prefix("/").unwrap_or(path)) };
    let sbin = prefix.join("sbin/lb");
    copy(binary, &staged(&sbin), 0o755)?;

    let unit = std::fs::read_to_string(root.join("packaging/lb.service")).context("reading packaging/lb.service")?;
    let unit = unit.replace(UNIT_BINARY, sbin.to_str().context("the prefix is not UTF-8")?);
    write(&staged(Path::new("/etc/systemd/system/lb.service")), unit.as_bytes(), 0o644)?;

    let config = staged(Path::new("/etc/lb/lb.toml"));
    if config.exists() {
        println!("kept      {} (it exists; the example is not installed over it)", config.display());
    } else {
        copy(&root.join("packaging/lb.toml"), &config, 0o640)?;
    }

    let share = prefix.join("share");
    for (shell, path) in [
        ("bash", "bash-completion/completions/lb"),
        ("zsh", "zsh/site-functions/_lb"),
        ("fish", "fish/vendor_completions.d/lb.fish"),
    ] {
        write(&staged(&share.join(path)), &output(binary, &["completions", shell])?, 0o644)?;
    }
    write(&staged(&share.join("man/man8/lb.8")), &output(binary, &["man"])?, 0o644)?;
    println!("\nNothing was started. Edit /etc/lb/lb.toml, then: systemctl daemon-reload && systemctl enable --now lb");
    Ok(())
}

fn output(binary: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(binary).args(args).output().with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!("{} {}: {}", binary.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes, mode)
}

/// Writes `to` whole (through a temporary file and a rename: a running `lb` binary is replaced,
/// never overwritten in place) with `mode`.
fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = to.parent().context("a path without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temporary = to.with_extension("xtask-new");
    std::fs::write(&temporary, bytes).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&temporary, to).with_context(|| format!("installing {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}
