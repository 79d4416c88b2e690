//! The BPF filesystem the pins live on: mounted when missing, with a warning when the mount
//! cannot outlive the daemon.

use anyhow::{Result, bail};
use std::ffi::CString;
use std::path::Path;

/// Makes sure bpffs is mounted at `root`. Returns what the operator must know: None when it was
/// there already or the new mount is the host's; a warning when it was mounted inside a mount
/// namespace of this process's own (e.g. under `ip netns exec`), where pins vanish with it.
pub fn ensure_mounted(root: &Path) -> Result<Option<String>> {
    if is_bpffs(root) {
        return Ok(None);
    }
    let target = CString::new(root.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated strings; mount(2) does not keep the pointers.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast()) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        bail!(
            "{} is not a mounted bpffs and mounting it failed ({error}): mount it with `mount -t bpf bpf {}`",
            root.display(),
            root.display()
        );
    }
    if in_host_mount_namespace() {
        tracing::warn!(path = %root.display(), "bpffs was not mounted: mounted it");
        return Ok(None);
    }
    let warning = format!(
        "bpffs was not mounted at {root}, and this daemon runs in a mount namespace of its own (as under \
         `ip netns exec`): the bpffs it mounted there, with the pinned data plane, vanishes when the daemon \
         exits, so the data plane stops with it and a restart is not hitless. Mount bpffs at {root} in the \
         host's mount namespace, or start the daemon with `nsenter --net=/run/netns/NAME` instead of `ip netns exec`",
        root = root.display()
    );
    tracing::warn!("{warning}");
    Ok(Some(warning))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next().map(Path::new) == Some(path) && fields.next() == Some("bpf")
    })
}

/// Whether this process shares the mount namespace of PID 1 (false when that cannot be seen).
fn in_host_mount_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/ns/mnt");
    let host = std::fs::metadata("/proc/1/ns/mnt");
    matches!((ours, host), (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev())
}
