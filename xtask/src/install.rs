//! `cargo xtask install`: `lb` as a service on this host (or under a staging directory), and
//! `cargo xtask package`: the same files as a Debian package, built with `dpkg-deb`.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the shipped unit expects the binary; replaced by the prefix's.
const UNIT_BINARY: &str = "/usr/local/sbin/lb";

/// Where the unit goes: the administrator's directory for a local install, the packages'
/// directory for a package.
const LOCAL_UNIT_DIR: &str = "/etc/systemd/system";
const PACKAGE_UNIT_DIR: &str = "/lib/systemd/system";

pub fn run(root: &Path, binary: &Path, prefix: &Path, destdir: &Path) -> Result<()> {
    stage(root, binary, prefix, destdir, Path::new(LOCAL_UNIT_DIR))?;
    println!("\nNothing was started. Edit /etc/lb/lb.toml, then: systemctl daemon-reload && systemctl enable --now lb");
    println!("On a backend behind an ipip/gue VIP instead: systemctl enable --now lb-decap@eth0 (its interface)");
    Ok(())
}

/// Builds `target/package/lb_VERSION_ARCH.deb` from the files `run` installs (prefix /usr,
/// the unit in /lib/systemd/system, /etc/lb/lb.toml a conffile). Installing it starts nothing.
pub fn package(root: &Path, binary: &Path) -> Result<PathBuf> {
    let out = root.join("target/package");
    let staging = out.join("root");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("clearing {}", staging.display()))?;
    }
    stage(root, binary, Path::new("/usr"), &staging, Path::new(PACKAGE_UNIT_DIR))?;
    let version = output(binary, &["--version"])?;
    let version = String::from_utf8_lossy(&version).split_whitespace().nth(1).context("lb --version")?.to_string();
    let arch = String::from_utf8(output(Path::new("dpkg"), &["--print-architecture"])?)?.trim().to_string();
    let control = format!(
        "Package: lb\nVersion: {version}\nArchitecture: {arch}\nMaintainer: lb developers <lb@localhost>\n\
         Section: net\nPriority: optional\nDepends: libc6\nRecommends: bird2\n\
         Description: eBPF/XDP layer-4 load balancer\n \
         Balances TCP and UDP services in an XDP program (Maglev hashing, connection table,\n \
         direct server return or full NAT, IPv4 and IPv6), with health checks, VRRPv3 pairs\n \
         and BGP announcements. The service is installed but not enabled or started.\n"
    );
    write(&staging.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    write(&staging.join("DEBIAN/conffiles"), b"/etc/lb/lb.toml\n", 0o644)?;
    let deb = out.join(format!("lb_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&staging)
        .arg(&deb)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb failed ({status})");
    }
    println!("\npackage: {}", deb.display());
    Ok(deb)
}

fn stage(root: &Path, binary: &Path, prefix: &Path, destdir: &Path, unit_dir: &Path) -> Result<()> {
    if !binary.is_file() {
        bail!("{}: no such binary", binary.display());
    }
    if !prefix.is_absolute() {
        bail!("--prefix {}: must be an absolute path", prefix.display());
    }
    let staged = |path: &Path| -> PathBuf { destdir.join(path.strip_prefix("/").unwrap_or(path)) };
    let sbin = prefix.join("sbin/lb");
    copy(binary, &staged(&sbin), 0o755)?;

    // The daemon's unit, and the backends' decapsulation unit (a template per interface).
    for name in ["lb.service", "lb-decap@.service"] {
        let unit = std::fs::read_to_string(root.join("packaging").join(name))
            .with_context(|| format!("reading packaging/{name}"))?;
        let unit = unit.replace(UNIT_BINARY, sbin.to_str().context("the prefix is not UTF-8")?);
        write(&staged(&unit_dir.join(name)), unit.as_bytes(), 0o644)?;
    }

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
