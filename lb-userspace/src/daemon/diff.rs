//! What changes between two desired states, in words an operator reads in `lb apply` and logs.

use crate::model::{BackendSpec, DesiredState, VipSpec};
use crate::planner::vip_id;

pub fn changes(old: &DesiredState, new: &DesiredState) -> Vec<String> {
    let mut out = Vec::new();
    for vip in &old.vips {
        if !new.vips.iter().any(|n| n.name == vip.name) {
            out.push(format!("- vip {} ({} {})", vip.name, vip.protocol, vip.address));
        }
    }
    for vip in &new.vips {
        match old.vips.iter().find(|o| o.name == vip.name) {
            None => {
                out.push(format!(
                    "+ vip {} ({} {}, {}, {} backends)",
                    vip.name,
                    vip.protocol,
                    vip.address,
                    vip.mode,
                    vip.backends.len()
                ));
            }
            Some(before) => vip_changes(before, vip, &mut out),
        }
    }
    out
}

fn vip_changes(old: &VipSpec, new: &VipSpec, out: &mut Vec<String>) {
    let name = &new.name;
    if vip_id(old) != vip_id(new) {
        out.push(format!("~ vip {name}: {} {} -> {} {}", old.protocol, old.address, new.protocol, new.address));
    }
    if old.mode != new.mode {
        out.push(format!("~ vip {name}: mode {} -> {}", old.mode, new.mode));
    }
    if old.snat != new.snat || old.snat_ports != new.snat_ports {
        out.push(format!(
            "~ vip {name}: snat {:?} {:?} -> {:?} {:?}",
            old.snat, old.snat_ports, new.snat, new.snat_ports
        ));
    }
    if (old.affinity, old.affinity_prefix) != (new.affinity, new.affinity_prefix) {
        out.push(format!("~ vip {name}: affinity {} -> {}", old.affinity_text(), new.affinity_text()));
    }
    if old.answer_ping != new.answer_ping {
        out.push(format!("~ vip {name}: answer_ping {} -> {}", old.answer_ping, new.answer_ping));
    }
    if old.check != new.check {
        out.push(format!("~ vip {name}: health check changed"));
    }
    for backend in &old.backends {
        if new.backend(backend.address).is_none() {
            out.push(format!("- vip {name}: backend {}", backend.address));
        }
    }
    for backend in &new.backends {
        match old.backend(backend.address) {
            None => out.push(format!("+ vip {name}: backend {}{}", backend.address, describe(backend))),
            Some(before) if before != backend => {
                let mut what = Vec::new();
                if before.weight != backend.weight {
                    what.push(format!("weight {} -> {}", before.weight, backend.weight));
                }
                if before.backup != backend.backup {
                    what.push(format!("backup {} -> {}", before.backup, backend.backup));
                }
                if before.drained != backend.drained {
                    what.push(if backend.drained { "drained".to_string() } else { "undrained".to_string() });
                }
                if before.mac != backend.mac {
                    what.push("mac changed".to_string());
                }
                out.push(format!("~ vip {name}: backend {} {}", backend.address, what.join(", ")));
            }
            Some(_) => {}
        }
    }
}

fn describe(backend: &BackendSpec) -> String {
    let mut parts = vec![format!(" weight {}", backend.weight)];
    if backend.backup {
        parts.push("backup".into());
    }
    if backend.drained {
        parts.push("drained".into());
    }
    parts.join(", ")
}
