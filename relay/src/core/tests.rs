//! Deterministic tests of the relay core: one rule per test, hostile inputs
//! included. Keys come from seeded RNGs, time is a number.

use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;
use ztmesh_proto::control::{NodeInfo, Peer};
use ztmesh_proto::keys::SigningKey;
use ztmesh_proto::netmap::sign;

use super::*;

const NOW: UnixMs = 1_700_000_000_000;
const LATER: UnixMs = NOW + 3_600_000;
const RELAY: &str = "r1";

struct World {
    controller: SigningKey,
    machines: Vec<SigningKey>,
    rng: StdRng,
}

impl World {
    fn new() -> Self {
        let mut rng = StdRng::seed_from_u64(11);
        let controller = SigningKey::generate(&mut rng);
        let machines = (0..8).map(|_| SigningKey::generate(&mut rng)).collect();
        Self {
            controller,
            machines,
            rng,
        }
    }

    fn core(&self) -> Core<u32> {
        self.core_with(100, u64::MAX)
    }

    fn core_with(&self, max_nodes: usize, memory_budget: u64) -> Core<u32> {
        Core::new(Config {
            relay_name: RELAY.into(),
            controller_key: self.controller.public(),
            max_nodes,
            memory_budget,
        })
    }

    /// Node `id` (machine key `machines[id]`), listing `peers`.
    fn map(&self, id: NodeId, peers: &[NodeId], serial: u64, not_after_ms: UnixMs) -> SignedNetMap {
        self.map_by(&self.controller, id, peers, serial, not_after_ms)
    }

    fn map_by(
        &self,
        signer: &SigningKey,
        id: NodeId,
        peers: &[NodeId],
        serial: u64,
        not_after_ms: UnixMs,
    ) -> SignedNetMap {
        sign(
            signer,
            &NetMap {
                serial,
                issued_at_ms: NOW - 1_000,
                not_after_ms,
                self_node: Some(NodeInfo {
                    id,
                    name: format!("n{id}"),
                    machine_key: self.machines[id as usize].public().as_bytes().to_vec(),
                    wg_key: vec![id as u8; 32],
                    ..Default::default()
                }),
                peers: peers
                    .iter()
                    .map(|&p| Peer {
                        id: p,
                        wg_key: vec![p as u8; 32],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )
    }

    fn proof(&mut self, id: NodeId, now: UnixMs) -> NodeProof {
        NodeProof::create(
            &self.machines[id as usize],
            &hello_method(RELAY),
            now,
            &mut self.rng,
        )
    }

    /// HELLO from node `id` on connection `id` with handle `id`.
    fn hello(
        &mut self,
        core: &mut Core<u32>,
        id: NodeId,
        peers: &[NodeId],
        serial: u64,
    ) -> Result<Welcome<u32>, Refusal> {
        let proof = self.proof(id, NOW);
        let map = self.map(id, peers, serial, LATER);
        core.hello(id, id as u32, &proof, &map, NOW)
    }
}

#[test]
fn forwards_between_nodes_whose_maps_list_each_other() {
    let mut w = World::new();
    let mut core = w.core();
    assert_eq!(
        w.hello(&mut core, 1, &[2], 10),
        Ok(Welcome {
            node: 1,
            replaced: None
        })
    );
    w.hello(&mut core, 2, &[1, 3], 10).unwrap();
    assert_eq!(core.route(1, 1, 2, 1_312, NOW), Ok(2));
    assert_eq!(core.route(2, 2, 1, 1_400, NOW), Ok(1));
    assert_eq!(core.route(1, 1, 2, 100, NOW), Ok(2));
    assert_eq!(
        core.traffic(1, 2),
        Traffic {
            bytes: 1_412,
            packets: 2
        }
    );
    assert_eq!(
        core.traffic(2, 1),
        Traffic {
            bytes: 1_400,
            packets: 1
        }
    );
}

#[test]
fn never_bridges_nodes_that_are_not_mutually_listed() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2, 3], 10).unwrap();
    w.hello(&mut core, 2, &[], 10).unwrap();
    w.hello(&mut core, 3, &[4], 10).unwrap();
    // 1 lists 2, 2 lists nobody: one-sided listing is not enough.
    assert_eq!(
        core.route(1, 1, 2, 10, NOW),
        Err(DropReason::NotListedByPeer)
    );
    assert_eq!(
        core.route(2, 2, 1, 10, NOW),
        Err(DropReason::NotListedBySource)
    );
    assert_eq!(
        core.route(1, 1, 3, 10, NOW),
        Err(DropReason::NotListedByPeer)
    );
    // 3 lists 4, which is not connected.
    assert_eq!(
        core.route(3, 3, 4, 10, NOW),
        Err(DropReason::PeerNotConnected)
    );
    assert_eq!(core.route(1, 1, 1, 10, NOW), Err(DropReason::ToSelf));
    assert_eq!(core.drops(DropReason::NotListedByPeer), 2);
    assert_eq!(core.drops(DropReason::NotListedBySource), 1);
    assert_eq!(core.traffic(1, 2), Traffic::default());
    let snap = core.snapshot();
    assert!(snap.pairs.is_empty(), "nothing was forwarded");
    assert_eq!(snap.drops["not_listed_by_peer"], 2);
    assert_eq!(snap.drops["peer_not_connected"], 1);
}

#[test]
fn a_deleted_node_is_cut_off_when_its_peer_presents_the_next_map() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2], 10).unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    assert_eq!(core.route(1, 1, 2, 10, NOW), Ok(2));
    // Node 1 is deleted: 2's next map no longer lists it. Node 1 still
    // holds its old map (it never gets a new one) and keeps sending.
    core.update_map(2, 2, &w.map(2, &[], 11, LATER), NOW)
        .unwrap();
    assert_eq!(
        core.route(1, 1, 2, 10, NOW),
        Err(DropReason::NotListedByPeer)
    );
    assert_eq!(
        core.route(2, 2, 1, 10, NOW),
        Err(DropReason::NotListedBySource)
    );
}

#[test]
fn an_impostor_with_a_copied_map_but_without_the_machine_key_is_refused() {
    let mut w = World::new();
    let mut core = w.core();
    let copied = w.map(1, &[2], 10, LATER);
    // Node 5's key proves possession, but the map is node 1's.
    let proof = w.proof(5, NOW);
    assert_eq!(
        core.hello(5, 5, &proof, &copied, NOW),
        Err(Refusal::KeyMismatch)
    );
    // A proof claiming node 1's key but signed by another key.
    let mut forged = w.proof(5, NOW);
    forged.machine_key = w.machines[1].public();
    assert_eq!(
        core.hello(5, 5, &forged, &copied, NOW),
        Err(Refusal::BadProof)
    );
    assert_eq!(core.sessions(), 0);
    assert_eq!(core.snapshot().refusals["key_mismatch"], 1);
    assert_eq!(core.snapshot().refusals["bad_proof"], 1);
}

#[test]
fn proofs_are_bound_to_this_relay_fresh_and_used_once() {
    let mut w = World::new();
    let mut core = w.core();
    let map = w.map(1, &[2], 10, LATER);
    let other_relay = NodeProof::create(
        &w.machines[1],
        &hello_method("r2"),
        NOW,
        &mut StdRng::seed_from_u64(3),
    );
    assert_eq!(
        core.hello(1, 1, &other_relay, &map, NOW),
        Err(Refusal::BadProof)
    );
    let old = w.proof(1, NOW - 61_000);
    assert_eq!(core.hello(1, 1, &old, &map, NOW), Err(Refusal::StaleProof));
    let proof = w.proof(1, NOW);
    core.hello(1, 1, &proof, &map, NOW).unwrap();
    core.disconnect(1, 1, NOW);
    assert_eq!(
        core.hello(2, 2, &proof, &map, NOW + 1),
        Err(Refusal::ReplayedProof)
    );
}

#[test]
fn maps_must_be_signed_by_the_controller_and_unexpired() {
    let mut w = World::new();
    let mut core = w.core();
    let rogue = SigningKey::generate(&mut StdRng::seed_from_u64(99));
    let proof = w.proof(1, NOW);
    let forged = w.map_by(&rogue, 1, &[2], 10, LATER);
    assert_eq!(
        core.hello(1, 1, &proof, &forged, NOW),
        Err(Refusal::BadMapSignature)
    );
    let proof = w.proof(1, NOW);
    let expired = w.map(1, &[2], 10, NOW);
    assert_eq!(
        core.hello(1, 1, &proof, &expired, NOW),
        Err(Refusal::ExpiredMap {
            not_after_ms: NOW,
            now_ms: NOW
        })
    );
    // Signed garbage, and a map without a self node.
    let proof = w.proof(1, NOW);
    let garbage = ztmesh_proto::netmap::sign_encoded(&w.controller, vec![0xff, 0xff]);
    assert!(matches!(
        core.hello(1, 1, &proof, &garbage, NOW),
        Err(Refusal::MalformedMap(_))
    ));
    let proof = w.proof(1, NOW);
    let selfless = sign(&w.controller, &NetMap::default());
    assert!(matches!(
        core.hello(1, 1, &proof, &selfless, NOW),
        Err(Refusal::MalformedMap(_))
    ));
    assert_eq!(core.sessions(), 0);
}

/// A rotation of the controller's key: during the grace period a map
/// signed by the new key passes if it carries the hand-over from the key
/// the relay was configured with; after it, or without it, it does not.
#[test]
fn maps_of_a_rotated_controller_key_pass_only_with_a_live_hand_over() {
    let mut w = World::new();
    let mut core = w.core();
    let next = SigningKey::generate(&mut StdRng::seed_from_u64(12));
    let grace_end = NOW + 60_000;
    let handed = |w: &World, serial| {
        let mut m =
            NetMap::decode(w.map_by(&next, 1, &[2], serial, LATER).netmap.as_slice()).unwrap();
        m.trust = Some(ztmesh_proto::control::ControllerTrust {
            handover: Some(ztmesh_proto::handover::sign(
                &w.controller,
                &next,
                NOW - 1,
                grace_end,
            )),
            ..Default::default()
        });
        sign(&next, &m)
    };
    let proof = w.proof(1, NOW);
    assert!(core.hello(1, 1, &proof, &handed(&w, 10), NOW).is_ok());
    core.disconnect(1, 1, NOW);
    let proof = w.proof(1, grace_end);
    assert_eq!(
        core.hello(1, 1, &proof, &handed(&w, 11), grace_end),
        Err(Refusal::BadMapSignature)
    );
    let proof = w.proof(1, NOW);
    assert_eq!(
        core.hello(1, 1, &proof, &w.map_by(&next, 1, &[2], 12, LATER), NOW),
        Err(Refusal::BadMapSignature)
    );
}

#[test]
fn a_stale_serial_is_refused_but_the_same_map_may_reconnect() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2], 10).unwrap();
    assert!(core.disconnect(1, 1, NOW));
    // Reconnecting with the map it still holds is fine...
    w.hello(&mut core, 1, &[2], 10).unwrap();
    core.disconnect(1, 1, NOW);
    // ...an older one is a rollback.
    assert_eq!(
        w.hello(&mut core, 1, &[2], 9),
        Err(Refusal::StaleSerial { got: 9, have: 10 })
    );
    // MAP within a session must be strictly newer.
    w.hello(&mut core, 1, &[2], 12).unwrap();
    assert_eq!(
        core.update_map(1, 1, &w.map(1, &[], 12, LATER), NOW),
        Err(Refusal::StaleSerial { got: 12, have: 12 })
    );
    assert_eq!(
        core.update_map(1, 1, &w.map(1, &[], 11, LATER), NOW),
        Err(Refusal::StaleSerial { got: 11, have: 12 })
    );
    assert_eq!(core.snapshot().refusals["stale_serial"], 3);
}

#[test]
fn a_map_update_must_be_for_the_same_node_and_key() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2], 10).unwrap();
    // Node 2's genuine map, pushed on node 1's session.
    assert_eq!(
        core.update_map(1, 1, &w.map(2, &[1], 11, LATER), NOW),
        Err(Refusal::KeyMismatch)
    );
    assert_eq!(
        core.update_map(1, 7, &w.map(1, &[2], 11, LATER), NOW),
        Err(Refusal::NoSession),
        "another connection cannot update the session"
    );
    assert_eq!(
        core.update_map(1, 1, &w.map(1, &[2], 11, NOW), NOW),
        Err(Refusal::ExpiredMap {
            not_after_ms: NOW,
            now_ms: NOW
        })
    );
    core.update_map(1, 1, &w.map(1, &[2, 3], 11, LATER), NOW)
        .unwrap();
    assert_eq!(core.snapshot().sessions[0].peers, 2);
    assert_eq!(core.snapshot().maps_accepted, 1);
}

#[test]
fn maps_that_expire_mid_session_stop_forwarding_both_ways() {
    let mut w = World::new();
    let mut core = w.core();
    let p1 = w.proof(1, NOW);
    core.hello(1, 1, &p1, &w.map(1, &[2], 10, NOW + 10), NOW)
        .unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    assert_eq!(core.route(1, 1, 2, 1, NOW + 9), Ok(2));
    assert_eq!(
        core.route(1, 1, 2, 1, NOW + 10),
        Err(DropReason::SourceMapExpired)
    );
    assert_eq!(
        core.route(2, 2, 1, 1, NOW + 10),
        Err(DropReason::PeerMapExpired)
    );
}

#[test]
fn a_new_hello_replaces_the_session_and_the_old_connection_goes_quiet() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2], 10).unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    // Node 1 reconnects on connection 9 (its network changed).
    let proof = w.proof(1, NOW);
    let welcome = core
        .hello(9, 90, &proof, &w.map(1, &[2], 10, LATER), NOW)
        .unwrap();
    assert_eq!(
        welcome,
        Welcome {
            node: 1,
            replaced: Some(1)
        }
    );
    assert_eq!(core.route(1, 1, 2, 1, NOW), Err(DropReason::NoSession));
    assert_eq!(core.route(1, 9, 2, 1, NOW), Ok(2));
    assert_eq!(
        core.route(2, 2, 1, 1, NOW),
        Ok(90),
        "replies go to the new one"
    );
    assert!(
        !core.disconnect(1, 1, NOW),
        "the old connection's close is ignored"
    );
    assert_eq!(core.sessions(), 2);
    assert!(core.disconnect(1, 9, NOW));
    assert_eq!(
        core.route(2, 2, 1, 1, NOW),
        Err(DropReason::PeerNotConnected)
    );
}

#[test]
fn max_nodes_refuses_the_next_node_but_not_a_reconnect() {
    let mut w = World::new();
    let mut core = w.core_with(2, u64::MAX);
    w.hello(&mut core, 1, &[2], 10).unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    assert_eq!(
        w.hello(&mut core, 3, &[1], 10),
        Err(Refusal::TooManyNodes { max: 2 })
    );
    w.hello(&mut core, 1, &[2], 11).unwrap();
    assert_eq!(core.sessions(), 2);
}

#[test]
fn the_memory_budget_refuses_new_nodes_and_keeps_the_connected_ones() {
    let mut w = World::new();
    let one = session_estimate(1, 2);
    let mut core = w.core_with(100, 2 * one + PAIR_BYTES);
    w.hello(&mut core, 1, &[2], 10).unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    assert_eq!(core.route(1, 1, 2, 1_312, NOW), Ok(2));
    let refused = w.hello(&mut core, 3, &[1], 10).unwrap_err();
    assert_eq!(
        refused,
        Refusal::OverMemoryBudget {
            need: one,
            used: 2 * one + PAIR_BYTES,
            budget: 2 * one + PAIR_BYTES
        }
    );
    assert!(refused.to_string().contains("memory budget"), "{refused}");
    // The connected nodes keep working, may grow their maps and reconnect.
    assert_eq!(core.route(2, 2, 1, 1_312, NOW), Ok(1));
    core.update_map(1, 1, &w.map(1, &[2, 3, 4, 5], 11, LATER), NOW)
        .unwrap();
    w.hello(&mut core, 2, &[1], 11).unwrap();
    assert_eq!(core.route(1, 1, 2, 1_312, NOW), Ok(2));
    assert!(core.memory_estimate() > 2 * one);
    // Once they leave, a new node fits again (the pair counters stay).
    core.disconnect(1, 1, NOW);
    core.disconnect(2, 2, NOW);
    w.hello(&mut core, 3, &[1], 10).unwrap();
    assert_eq!(core.snapshot().refusals["over_memory_budget"], 1);
}

#[test]
fn memory_is_accounted_exactly_through_joins_updates_and_leaves() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 1, &[2, 3], 10).unwrap();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    core.update_map(2, 2, &w.map(2, &[1, 3, 4], 11, LATER), NOW)
        .unwrap();
    assert_eq!(
        core.memory_estimate(),
        session_estimate(2, 2) + session_estimate(3, 2)
    );
    core.disconnect(1, 1, NOW);
    core.disconnect(2, 2, NOW);
    assert_eq!(core.memory_estimate(), 0);
}

#[test]
fn unauthenticated_buffers_take_at_most_their_share_of_the_budget() {
    let mut w = World::new();
    let budget = 64 * 1_000_000;
    let mut core = w.core_with(100, budget);
    let share = budget / UNAUTHENTICATED_SHARE;
    let per_source = share / SOURCE_SHARE;
    assert!(per_source > MIN_SOURCE_SHARE);
    let src = |i: u8| Source::from(std::net::IpAddr::from([198, 18, 0, i]));
    // One source gets an eighth of the share, not more.
    core.reserve_unauthenticated(src(1), per_source).unwrap();
    assert!(core.reserve_unauthenticated(src(1), 1).is_err());
    // Eight sources fill the share; one byte more is refused to a ninth.
    for i in 2..=7 {
        core.reserve_unauthenticated(src(i), per_source).unwrap();
    }
    core.reserve_unauthenticated(src(8), per_source - 10)
        .unwrap();
    let refused = core.reserve_unauthenticated(src(9), 11).unwrap_err();
    assert!(
        matches!(refused, Refusal::OverMemoryBudget { need: 11, .. }),
        "{refused:?}"
    );
    core.reserve_unauthenticated(src(9), 10).unwrap();
    assert_eq!(core.memory_estimate(), share);
    assert_eq!(core.snapshot().unauthenticated_buffers, share);
    // Buffers in flight count against newcomers like sessions do.
    w.hello(&mut core, 1, &[2], 10).unwrap();
    for i in 1..=7 {
        core.release_unauthenticated(src(i), per_source);
    }
    core.release_unauthenticated(src(8), per_source - 10);
    core.release_unauthenticated(src(9), 10);
    assert_eq!(core.memory_estimate(), session_estimate(1, 2));
    // A session's large MAP buffer is counted but never refused...
    core.hold_session_buffer(budget);
    assert_eq!(core.snapshot().session_buffers, budget);
    // ...and while it is held, strangers get nothing.
    assert!(core.reserve_unauthenticated(src(1), 1).is_err());
    core.release_session_buffer(budget);
    core.reserve_unauthenticated(src(1), 1).unwrap();
    core.release_unauthenticated(src(1), 1);
    // Releasing more than was held saturates instead of wrapping.
    core.release_unauthenticated(src(1), 5);
    assert_eq!(core.memory_estimate(), session_estimate(1, 2));
    assert_eq!(core.snapshot().refusals["over_memory_budget"], 3);
}

#[test]
fn remembered_serials_stay_bounded() {
    let w = World::new();
    let mut core = w.core_with(1, u64::MAX);
    // cap = max(4 * max_nodes, 1024) = 1024 remembered nodes.
    for id in 0..3_000u64 {
        core.remember_serial(id, 1, NOW + id as i64);
    }
    assert_eq!(core.serials.len(), 1_024);
    assert!(core.serials.contains_key(&2_999));
    assert!(
        !core.serials.contains_key(&0),
        "the oldest is forgotten first"
    );
}

#[test]
fn counters_for_shell_drops_and_the_snapshot_are_deterministic() {
    let mut w = World::new();
    let mut core = w.core();
    w.hello(&mut core, 2, &[1], 10).unwrap();
    w.hello(&mut core, 1, &[2], 10).unwrap();
    core.route(2, 2, 1, 5, NOW).unwrap();
    core.route(1, 1, 2, 7, NOW).unwrap();
    core.count_drop(DropReason::MalformedFrame);
    core.count_drop(DropReason::Congested);
    let a = core.snapshot();
    assert_eq!(a, core.snapshot());
    assert_eq!(
        a.sessions.iter().map(|s| s.node).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        a.pairs,
        vec![
            PairInfo {
                src: 1,
                dst: 2,
                bytes: 7,
                packets: 1
            },
            PairInfo {
                src: 2,
                dst: 1,
                bytes: 5,
                packets: 1
            }
        ]
    );
    assert_eq!(a.drops.len(), DropReason::ALL.len());
    assert_eq!(a.drops["malformed_frame"], 1);
    assert_eq!(a.drops["congested"], 1);
    assert_eq!(a.hellos_accepted, 2);
}

/// The split the shell uses (checks outside the lock, state inside): a
/// result of the stateless checks only opens or updates a session of the
/// key it was checked against, and every refusal is still counted.
#[test]
fn verified_maps_are_admitted_only_for_the_key_they_were_checked_against() {
    let mut w = World::new();
    let mut core = w.core();
    let v = core.verifier();
    let p1 = w.proof(1, NOW);
    let p2 = w.proof(2, NOW);
    let checked1 = v.hello(&p1, &w.map(1, &[2], 10, LATER), NOW).unwrap();
    // Node 1's verified map with node 2's proof: refused, counted.
    assert_eq!(
        core.admit(2, 2, &p2, checked1.clone(), NOW).err(),
        Some(Refusal::KeyMismatch)
    );
    core.admit(1, 1, &p1, checked1, NOW).unwrap();
    // A map checked against node 2's key cannot update node 1's session.
    let key2 = w.machines[2].public();
    let checked2 = v.map(&key2, &w.map(2, &[1], 11, LATER), NOW).unwrap();
    assert_eq!(
        core.apply_map(1, 1, checked2, NOW),
        Err(Refusal::KeyMismatch)
    );
    let key1 = w.machines[1].public();
    let newer = v.map(&key1, &w.map(1, &[2, 3], 11, LATER), NOW).unwrap();
    assert_eq!(
        core.apply_map(1, 9, newer.clone(), NOW),
        Err(Refusal::NoSession)
    );
    core.apply_map(1, 1, newer, NOW).unwrap();
    let snap = core.snapshot();
    assert_eq!((snap.hellos_accepted, snap.maps_accepted), (1, 1));
    assert_eq!(snap.sessions[0].peers, 2);
    assert_eq!(
        snap.refusals.values().sum::<u64>(),
        3,
        "{:?}",
        snap.refusals
    );
}
