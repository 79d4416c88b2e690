//! Carrying a data plane's state into maps of a new layout or new sizes, while it forwards.
//!
//! The old program keeps running on the old maps until the new one takes its place in the link,
//! so the state is copied twice: everything before the swap, then what the old program added
//! or changed until it stopped (new flows, their last activity, how they ended) and the final
//! counters. Tables (VIPs, Maglev rings) are not copied: the daemon publishes them from its
//! desired state before the swap. Backend entries are copied, so that connection-table entries
//! keep naming the right backend.
//!
//! What a step cannot carry: a counter increment that lands between reading an old counter and
//! writing the sum (counts of a few packets), and, within the milliseconds between the swap and
//! the second copy, a new flow of the new program that picks the NAT source port an old flow
//! of the same backend took in the same window (its replies then go to the new flow).

use super::pins::MapSet;
use anyhow::{Context, Result, anyhow};
use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::maps::*;
use std::collections::HashMap as Dict;

/// The maps of the set being migrated from, opened by their pins.
pub struct OldMaps {
    pub set: MapSet,
    maps: Dict<&'static str, Map>,
}

/// What a copy carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub connections: usize,
    pub nat_entries: usize,
    pub backends: usize,
    /// Counter entries (per VIP, backend and verdict reason) added to the new maps.
    pub counters: usize,
}

impl std::ops::AddAssign for Carried {
    fn add_assign(&mut self, other: Self) {
        self.connections += other.connections;
        self.nat_entries += other.nat_entries;
        self.backends += other.backends;
        self.counters += other.counters;
    }
}

impl OldMaps {
    pub fn open(set: &MapSet) -> Result<Self> {
        let mut maps = Dict::new();
        for name in set.map_names() {
            let data = MapData::from_pin(set.map(name)).with_context(|| format!("{set}: opening {name}"))?;
            maps.insert(name, Map::from_map_data(data).with_context(|| format!("{set}: {name}"))?);
        }
        Ok(Self { set: set.clone(), maps })
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.maps.get(name).ok_or_else(|| anyhow!("{}: no map {name}", self.set))
    }
}

/// First pass (the old program still forwards): connections, NAT entries and backends.
pub fn copy_state(old: &OldMaps, new: &mut aya::Ebpf) -> Result<Carried> {
    Ok(Carried {
        connections: merge_hash::<ConnState>(old.map(MAP_CONNS)?, map_mut(new, MAP_CONNS)?, carry_connection)?,
        nat_entries: merge_hash::<NatReverse>(old.map(MAP_NAT_REV)?, map_mut(new, MAP_NAT_REV)?, merge_nat)?,
        backends: copy_backends(old.map(MAP_BACKENDS)?, map_mut(new, MAP_BACKENDS)?)?,
        counters: 0,
    })
}

/// Second pass (the new program forwards): what the old one added since the first pass, and
/// the old counters' final values added to the new ones.
pub fn copy_rest(old: &OldMaps, new: &mut aya::Ebpf) -> Result<Carried> {
    Ok(Carried {
        connections: merge_hash::<ConnState>(old.map(MAP_CONNS)?, map_mut(new, MAP_CONNS)?, carry_connection)?,
        nat_entries: merge_hash::<NatReverse>(old.map(MAP_NAT_REV)?, map_mut(new, MAP_NAT_REV)?, merge_nat)?,
        // The daemon has written its own backend entries by now.
        backends: 0,
        counters: add_counters::<u64>(old.map(MAP_STATS_REASON)?, map_mut(new, MAP_STATS_REASON)?, |a, b| a + b)?
            + add_counters::<Traffic>(old.map(MAP_STATS_VIP)?, map_mut(new, MAP_STATS_VIP)?, add_traffic)?
            + add_counters::<Traffic>(old.map(MAP_STATS_BACKEND)?, map_mut(new, MAP_STATS_BACKEND)?, add_traffic)?,
    })
}

fn map_mut<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

/// Writes every entry of `old` into `new`, merged with what `new` holds for the key. Returns
/// how many entries were written.
fn merge_hash<V: Pod + PartialEq>(old: &Map, new: &mut Map, merge: fn(V, Option<V>) -> V) -> Result<usize> {
    let old: HashMap<&MapData, FlowKey, V> = HashMap::try_from(old)?;
    let mut new: HashMap<&mut MapData, FlowKey, V> = HashMap::try_from(new)?;
    let (mut written, mut no_room) = (0, 0);
    for entry in old.iter() {
        // An entry may vanish between listing and reading (evicted or swept): skip it.
        let Ok((key, value)) = entry else { continue };
        let current = new.get(&key, 0).ok();
        let merged = merge(value, current);
        if current != Some(merged) {
            match new.insert(key, merged, 0) {
                Ok(()) => written += 1,
                // A smaller table than the old one's: what does not fit is lost, not the rest.
                Err(aya::maps::MapError::SyscallError(error)) if error.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    no_room += 1
                }
                Err(error) => return Err(error).context("writing a migrated entry"),
            }
        }
    }
    if no_room > 0 {
        tracing::warn!(no_room, "the new table is full: entries of the old one were not carried");
    }
    Ok(written)
}

/// A connection as [`merge_connection`] carries it, with a time where the old program kept
/// none: before layout 3 DSR and tunnel entries had no timestamp (0), and the sweep would take
/// them for long idle.
fn carry_connection(old: ConnState, new: Option<ConnState>) -> ConnState {
    let old = if old.snat_port == 0 && old.last_seen == 0 {
        ConnState { last_seen: super::clock_ticks(), ..old }
    } else {
        old
    };
    merge_connection(old, new)
}

/// A connection keeps the new map's entry (the new program may have moved on) but the latest
/// activity of the two.
fn merge_connection(old: ConnState, new: Option<ConnState>) -> ConnState {
    match new {
        None => old,
        Some(new) => ConnState { last_seen: latest(old.last_seen, new.last_seen), ..new },
    }
}

/// A NAT entry also keeps every end the old program saw.
fn merge_nat(old: NatReverse, new: Option<NatReverse>) -> NatReverse {
    match new {
        None => old,
        Some(new) => {
            NatReverse { last_seen: latest(old.last_seen, new.last_seen), ended: old.ended | new.ended, ..new }
        }
    }
}

/// The later of two clock readings (the clock wraps: compare by distance).
fn latest(a: u32, b: u32) -> u32 {
    if b.wrapping_sub(a) < u32::MAX / 2 { b } else { a }
}

fn copy_backends(old: &Map, new: &mut Map) -> Result<usize> {
    let old: Array<&MapData, Backend> = Array::try_from(old)?;
    let mut new: Array<&mut MapData, Backend> = Array::try_from(new)?;
    let mut written = 0;
    for index in 0..old.len().min(new.len()) {
        let backend = old.get(&index, 0)?;
        if backend != Backend::default() {
            new.set(index, backend, 0)?;
            written += 1;
        }
    }
    Ok(written)
}

/// Adds every CPU's old count to the new map's, entry by entry. Returns the entries changed.
fn add_counters<V: Pod + Default + PartialEq>(old: &Map, new: &mut Map, add: fn(V, V) -> V) -> Result<usize> {
    let old: PerCpuArray<&MapData, V> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<&mut MapData, V> = PerCpuArray::try_from(new)?;
    let mut written = 0;
    for index in 0..old.len().min(new.len()) {
        let before = old.get(&index, 0)?;
        if before.iter().all(|v| *v == V::default()) {
            continue;
        }
        let now = new.get(&index, 0)?;
        let sums: Vec<V> = before.iter().zip(now.iter()).map(|(b, n)| add(*b, *n)).collect();
        new.set(index, PerCpuValues::try_from(sums)?, 0)?;
        written += 1;
    }
    Ok(written)
}

fn add_traffic(a: Traffic, b: Traffic) -> Traffic {
    Traffic { packets: a.packets + b.packets, bytes: a.bytes + b.bytes, new_flows: a.new_flows + b.new_flows }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_entries_keep_the_new_state_and_the_latest_activity() {
        let old = NatReverse {
            last_seen: 100,
            ended: lb_common::nat::ENDED_FIN_CLIENT,
            client_port: 1,
            ..Default::default()
        };
        let new = NatReverse {
            last_seen: 90,
            ended: lb_common::nat::ENDED_FIN_BACKEND,
            client_port: 2,
            ..Default::default()
        };
        let merged = merge_nat(old, Some(new));
        assert_eq!(merged.client_port, 2);
        assert_eq!(merged.last_seen, 100);
        assert_eq!(merged.ended, lb_common::nat::ENDED_FIN_CLIENT | lb_common::nat::ENDED_FIN_BACKEND);
        assert_eq!(merge_nat(old, None), old);
        let conn = ConnState { backend: 3, last_seen: 5, ..Default::default() };
        assert_eq!(merge_connection(conn, Some(ConnState { backend: 4, last_seen: 7, ..conn })).backend, 4);
        assert_eq!(merge_connection(conn, Some(ConnState { last_seen: 2, ..conn })).last_seen, 5);
        let untimed = ConnState { backend: 3, ..Default::default() };
        assert!(carry_connection(untimed, None).last_seen > 0, "a DSR entry of layout 2 is stamped now");
        assert_eq!(carry_connection(conn, None), conn);
    }

    #[test]
    fn the_latest_reading_survives_the_clock_wrapping() {
        assert_eq!(latest(u32::MAX - 1, 3), 3);
        assert_eq!(latest(3, u32::MAX - 1), 3);
        assert_eq!(latest(10, 20), 20);
    }
}
