//! Privileged tests must run, not silently skip: without root they fail unless the user opts out.

pub const OPT_OUT_VAR: &str = "LB_SKIP_PRIVILEGED";

/// Returns true when the test may go on. Without root: panics, or with `LB_SKIP_PRIVILEGED=1`
/// prints that the test is skipped and returns false.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var(OPT_OUT_VAR).as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: needs root ({OPT_OUT_VAR}=1)");
        return false;
    }
    panic!(
        "{test} needs root (XDP, network namespaces): run `sudo cargo xtask test`, or set {OPT_OUT_VAR}=1 to skip it"
    );
}
