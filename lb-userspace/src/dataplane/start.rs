//! Which pinned state a starting daemon takes over: the rule, apart from the syscalls that
//! gather its inputs, so that it is tested on the host.

use super::pins::{Fit, MapSet};
use anyhow::{Result, bail};
use lb_common::layout::LAYOUT_VERSION;

/// Where the data plane's maps come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Nothing pinned: new maps.
    Fresh,
    /// Maps of this layout and sizes: used as they are.
    Reuse(MapSet),
    /// Another layout or other sizes: the state is carried into new maps.
    Migrate { from: MapSet, why: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub start: Start,
    /// Sets left by an interrupted migration: removed.
    pub leftovers: Vec<MapSet>,
}

/// Decides from the pinned map sets (oldest first, each with its fit) and the one the pinned
/// link's program uses, if any. That one holds the state traffic is using, so it wins; without
/// it, the newest. A layout newer than this build's is refused: a downgrade would mix layouts.
pub fn decide(sets: &[(MapSet, Fit)], live: Option<&MapSet>) -> Result<Decision> {
    if let Some((newer, _)) = sets.iter().find(|(_, fit)| *fit == Fit::Newer) {
        bail!(
            "pinned state of {newer} comes from a newer build (this one reads layouts up to {LAYOUT_VERSION}): \
             run that build, or remove the data plane with `lb detach` (this drops connection state)"
        );
    }
    let Some(source) = live.and_then(|live| sets.iter().find(|(set, _)| set == live)).or(sets.last()) else {
        return Ok(Decision { start: Start::Fresh, leftovers: Vec::new() });
    };
    let (from, fit) = source.clone();
    let leftovers = sets.iter().map(|(set, _)| set).filter(|set| **set != from).cloned().collect();
    let start = match fit {
        Fit::Exact => Start::Reuse(from),
        Fit::Resized(reasons) => Start::Migrate { from, why: reasons.join("; ") },
        Fit::Older => Start::Migrate { why: format!("this build uses layout {LAYOUT_VERSION}"), from },
        Fit::Newer => unreachable!("refused above"),
    };
    Ok(Decision { start, leftovers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn set(version: u32, generation: u32) -> MapSet {
        MapSet::for_test(version, generation, PathBuf::from(format!("/sys/fs/bpf/t/v{version}-{generation}")))
    }

    #[test]
    fn nothing_pinned_starts_fresh() {
        assert_eq!(decide(&[], None).unwrap(), Decision { start: Start::Fresh, leftovers: vec![] });
    }

    #[test]
    fn this_layout_with_these_sizes_is_reused() {
        let current = set(LAYOUT_VERSION, 1);
        let decision = decide(&[(current.clone(), Fit::Exact)], Some(&current)).unwrap();
        assert_eq!(decision.start, Start::Reuse(current));
    }

    #[test]
    fn an_older_layout_or_other_sizes_are_migrated() {
        let old = set(1, 0);
        let decision = decide(&[(old.clone(), Fit::Older)], None).unwrap();
        assert!(matches!(decision.start, Start::Migrate { ref from, .. } if *from == old), "{decision:?}");
        let resized = set(LAYOUT_VERSION, 3);
        let fit = Fit::Resized(vec!["CONNS has 1024 entries, the configuration gives 2048".into()]);
        let decision = decide(&[(resized.clone(), fit)], Some(&resized)).unwrap();
        assert!(matches!(decision.start, Start::Migrate { ref why, .. } if why.contains("CONNS")), "{decision:?}");
    }

    #[test]
    fn the_set_in_use_wins_over_a_newer_one_an_interrupted_migration_left() {
        // The daemon stopped after writing the new set but before the swap: traffic still uses
        // the old set, so the migration starts over from it.
        let (old, new) = (set(1, 0), set(LAYOUT_VERSION, 1));
        let sets = [(old.clone(), Fit::Older), (new.clone(), Fit::Exact)];
        let decision = decide(&sets, Some(&old)).unwrap();
        assert!(matches!(decision.start, Start::Migrate { ref from, .. } if *from == old));
        assert_eq!(decision.leftovers, vec![new.clone()]);
        // After the swap the new set is in use: the old one is a leftover.
        let decision = decide(&sets, Some(&new)).unwrap();
        assert_eq!(decision, Decision { start: Start::Reuse(new), leftovers: vec![old] });
    }

    #[test]
    fn without_a_live_link_the_newest_set_is_taken() {
        let (a, b) = (set(LAYOUT_VERSION, 1), set(LAYOUT_VERSION, 2));
        let decision = decide(&[(a.clone(), Fit::Exact), (b.clone(), Fit::Exact)], None).unwrap();
        assert_eq!(decision, Decision { start: Start::Reuse(b), leftovers: vec![a] });
    }

    #[test]
    fn a_newer_layout_is_refused() {
        let newer = set(LAYOUT_VERSION + 1, 1);
        let error = decide(&[(newer.clone(), Fit::Newer)], Some(&newer)).unwrap_err().to_string();
        assert!(error.contains("newer build") && error.contains("lb detach"), "{error}");
    }
}
