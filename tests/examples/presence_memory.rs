//! What one node's view of the cluster's presence costs (issue #34,
//! docs/scaling.md): the memory of `RemotePresence` holding USERS users
//! spread over NODES other nodes, the time to apply a change, and the
//! lookups a delivery makes (which nodes hold a user, how many
//! connections). Prints one JSON object.
//!
//! ```sh
//! cargo run --release -p sockets-tests --example presence_memory -- 1000000 49
//! ```
//!
//! Bounded: at most 5,000,000 users and 1,000 nodes.

use std::hint::black_box;
use std::time::Instant;

use serde_json::json;
use sockets_host::cluster::{Announcement, RemotePresence};

/// A user id as long as the marketplace's (`usr_` and a UUID).
fn user(n: usize) -> String {
    format!("usr_{n:08x}-0000-7000-8000-{:012x}", n * 7919)
}

fn node_name(node: usize) -> String {
    format!("node-{node}")
}

fn session(node: usize) -> String {
    format!("session-{node}")
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let users: usize = args.next().map_or(Ok(1_000_000), |n| n.parse())?;
    let nodes: usize = args.next().map_or(Ok(49), |n| n.parse())?;
    let users = users.clamp(1, 5_000_000);
    let nodes = nodes.clamp(1, 1_000);
    let presence = RemotePresence::default();
    let mut seq = vec![1u64; nodes];
    for node in 0..nodes {
        let empty = Announcement {
            session: session(node),
            seq: 1,
            full: true,
            ..Announcement::default()
        };
        presence.apply(&node_name(node), empty, Instant::now());
    }
    let mut change = |node: usize, user: String, count: u32| {
        seq[node] += 1;
        let change = Announcement {
            session: session(node),
            seq: seq[node],
            users: [(user, count)].into(),
            ..Announcement::default()
        };
        let applied = presence.apply(&node_name(node), change, Instant::now());
        assert!(!applied.wants_table, "the changes are in step");
    };

    // Every user announced in a change of its own, each message freed at
    // once: the resident memory grows by the index alone (a table of a
    // million users, freed once applied, would leave memory the index
    // reuses, hiding its size).
    let before = sockets_tests::rss_kib()?;
    let started = Instant::now();
    for n in 0..users {
        change(n % nodes, user(n), 1);
    }
    let apply_users = started.elapsed();
    let after = sockets_tests::rss_kib()?;

    // A delivery asks which nodes hold the user and how many connections.
    let lookups = 1_000_000;
    let started = Instant::now();
    for n in 0..lookups {
        let name = user((n * 31) % users);
        black_box(presence.nodes_holding([name.as_str()], Instant::now()));
        black_box(presence.connections_of(&name, Instant::now()));
    }
    let lookup = started.elapsed();
    let started = Instant::now();
    for n in 0..lookups {
        black_box(user((n * 31) % users));
    }
    let naming = started.elapsed();
    let users_known = presence.users_known();

    println!(
        "{}",
        json!({
            "users": users,
            "nodes": nodes,
            "users_known": users_known,
            "rss_growth_mib": after.saturating_sub(before) as f64 / 1024.0,
            "bytes_per_user": (after.saturating_sub(before) * 1024) as f64 / users as f64,
            "apply_change_ns": apply_users.as_nanos() as f64 / users as f64,
            "lookups_per_delivery_ns": lookup.saturating_sub(naming).as_nanos() as f64 / lookups as f64,
        })
    );
    Ok(())
}
