//! `chat`: P student/consultant pairs; each student keeps W `sendMessage`
//! in flight (a new one per ack) for D seconds, then waits for what is
//! outstanding. With a rate, students send on a fixed schedule instead
//! (open loop, still at most W in flight), to measure latency below the
//! peak. Each message's text carries its pair, sequence and send
//! time, so the consultant's side measures delivery latency and finds lost
//! and duplicated messages.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::peer::{self, Incoming, Target};
use crate::server::CpuTime;
use crate::stats::Latencies;
use crate::{Tokens, server, source_address};

/// How long the run waits for outstanding acks and pushes after sending.
const DRAIN: Duration = Duration::from_secs(5);

pub struct Options {
    pub target: Target,
    pub server: SocketAddr,
    pub pairs: usize,
    pub window: usize,
    pub duration: Duration,
    /// Messages per second over all pairs; `None` sends as fast as acks come.
    pub rate: Option<f64>,
    /// The server's process, to report its CPU time per delivered message.
    pub server_pid: Option<u32>,
}

struct SenderResult {
    acked: Seqs,
    failed: u64,
    ack_latency: Latencies,
}

struct ReceiverResult {
    seen: Seqs,
    duplicates: u64,
    delivery_latency: Latencies,
}

/// A set of one pair's sequence numbers, which run from 1 without gaps: a
/// bit each instead of a hash-set entry, which had been the load
/// generator's largest cost of its own.
#[derive(Default)]
struct Seqs {
    bits: Vec<u64>,
}

impl Seqs {
    /// More than any bounded run sends per pair; a set stays under 512 MiB
    /// even if a server garbled a sequence number.
    const MAX: u64 = 1 << 32;

    /// Adds `seq` (at most [`Seqs::MAX`]); false if it was there already.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = Self::slot(seq);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        fresh
    }

    fn len(&self) -> u64 {
        self.bits
            .iter()
            .map(|bits| u64::from(bits.count_ones()))
            .sum()
    }

    /// How many of these `other` lacks.
    fn missing_from(&self, other: &Self) -> u64 {
        let mut missing = 0;
        for (word, bits) in self.bits.iter().enumerate() {
            let theirs = other.bits.get(word).copied().unwrap_or(0);
            missing += u64::from((bits & !theirs).count_ones());
        }
        missing
    }

    fn slot(seq: u64) -> (usize, u64) {
        let word = usize::try_from(seq / 64).expect("sequence numbers fit in memory");
        (word, 1 << (seq % 64))
    }
}

/// `sendMessage`'s data.
#[derive(Serialize)]
struct SendMessage<'a> {
    to: &'a str,
    text: &'a str,
}

/// The part of a pushed `message` the run reads.
#[derive(Deserialize)]
struct PushedMessage<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

pub async fn run(options: Options, tokens: &Tokens) -> anyhow::Result<Value> {
    let started = Instant::now();
    let (stop_tx, stop) = watch::channel(false);
    let (go_tx, go) = watch::channel(false);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for pair in 0..options.pairs {
        let source = source_address(pair);
        let student = peer::connect(
            options.target,
            options.server,
            source,
            &tokens.mint(&format!("bench_s_{pair}"), "student"),
        )
        .await?;
        let consultant = peer::connect(
            options.target,
            options.server,
            source,
            &tokens.mint(&format!("bench_c_{pair}"), "consultant"),
        )
        .await?;
        receivers.push(tokio::spawn(receive(
            options.target,
            consultant,
            started,
            stop.clone(),
        )));
        let pace = options
            .rate
            .map(|rate| Duration::from_secs_f64(options.pairs as f64 / rate));
        senders.push(tokio::spawn(send(
            options.target,
            student,
            pair,
            Pacing {
                window: options.window,
                every: pace,
            },
            started,
            go.clone(),
            stop.clone(),
        )));
    }
    // Every pair is connected: the measured part starts now, for all at once.
    let cpu_before = match options.server_pid {
        Some(pid) => Some((server::cpu_time(pid)?, server::cpu_time_by_thread(pid)?)),
        None => None,
    };
    let own_cpu_before = server::cpu_time(std::process::id())?;
    let sending = Instant::now();
    let _ = go_tx.send(true);
    tokio::time::sleep(options.duration).await;
    let _ = stop_tx.send(true);
    // Read at the stop: the drain that follows is mostly waiting.
    let sent_for = sending.elapsed();
    let own_cpu = server::cpu_time(std::process::id())?.since(own_cpu_before);
    let server_cpu = match (options.server_pid, cpu_before) {
        (Some(pid), Some((total, threads))) => Some((
            server::cpu_time(pid)?.since(total),
            server::cpu_time_by_thread(pid)?
                .into_iter()
                .map(|(name, spent)| {
                    let before = threads.get(&name).copied().unwrap_or_default();
                    let spent = spent.saturating_sub(before).as_millis();
                    (name, u64::try_from(spent).unwrap_or(u64::MAX))
                })
                .filter(|(_, ms)| *ms > 0)
                .collect::<BTreeMap<_, _>>(),
        )),
        _ => None,
    };

    let mut acked = 0u64;
    let mut failed = 0u64;
    let mut lost = 0u64;
    let mut duplicates = 0u64;
    let mut delivered = 0u64;
    let mut ack_latency = Latencies::default();
    let mut delivery_latency = Latencies::default();
    for (sender, receiver) in senders.into_iter().zip(receivers) {
        let sent = sender.await??;
        let received = receiver.await??;
        acked += sent.acked.len();
        failed += sent.failed;
        lost += sent.acked.missing_from(&received.seen);
        duplicates += received.duplicates;
        delivered += received.seen.len();
        ack_latency.extend(sent.ack_latency);
        delivery_latency.extend(received.delivery_latency);
    }
    let seconds = options.duration.as_secs_f64();
    Ok(json!({
        "run": "chat",
        "target": format!("{:?}", options.target).to_lowercase(),
        "pairs": options.pairs,
        "window": options.window,
        "rate_per_s": options.rate,
        "duration_s": seconds,
        "acked": acked,
        "failed": failed,
        "delivered": delivered,
        "delivered_per_s": delivered as f64 / seconds,
        "ack_latency": ack_latency.summary(),
        "delivery_latency": delivery_latency.summary(),
        "lost": lost,
        "duplicated": duplicates,
        // While sending; per message delivered (the few still in flight at
        // the stop are counted as delivered, not as CPU).
        "server_cpu": server_cpu.map(|(cpu, by_thread)| {
            let mut summary = cpu_summary(cpu, sent_for, delivered);
            summary["ms_by_thread"] = json!(by_thread);
            summary
        }),
        // The load generator's own cost: a share near 1 on its one core
        // means the generator, not the server, set the pace.
        "loadgen_cpu": cpu_summary(own_cpu, sent_for, delivered),
    }))
}

/// CPU time spent over `wall`: in total, as a share of one core, and per
/// message delivered, in total and split into user and kernel time (the
/// kernel's part is mostly the sockets' system calls, which no server
/// code makes cheaper).
fn cpu_summary(cpu: CpuTime, wall: Duration, delivered: u64) -> Value {
    let per_delivered =
        |spent: Duration| round(spent.as_secs_f64() * 1e6 / delivered.max(1) as f64, 1);
    let total = cpu.total();
    json!({
        "ms": u64::try_from(total.as_millis()).unwrap_or(u64::MAX),
        "share_of_one_core": round(total.as_secs_f64() / wall.as_secs_f64(), 3),
        "us_per_delivered": per_delivered(total),
        "user_us_per_delivered": per_delivered(cpu.user),
        "kernel_us_per_delivered": per_delivered(cpu.kernel),
    })
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// `"<seq>:<micros since start>"`
fn text(seq: u64, started: Instant) -> String {
    format!("{seq}:{}", started.elapsed().as_micros())
}

/// How a student sends.
struct Pacing {
    /// Most messages in flight.
    window: usize,
    /// One message per period; `None`: whenever the window has room.
    every: Option<Duration>,
}

async fn send(
    target: Target,
    socket: peer::Socket,
    pair: usize,
    pacing: Pacing,
    started: Instant,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SenderResult> {
    go.wait_for(|go| *go).await?;
    let (mut writer, mut reader) = socket.split();
    let to = format!("bench_c_{pair}");
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut result = SenderResult {
        acked: Seqs::default(),
        failed: 0,
        ack_latency: Latencies::default(),
    };
    let mut next = 1u64;
    let mut stopping = false;
    let mut deadline = None;
    // Paced senders start spread over one period, not all at once.
    let period = pacing.every.unwrap_or(Duration::from_secs(1));
    let offset = period.mul_f64((pair % 16) as f64 / 16.0);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut due = 0usize;
    loop {
        let room = pacing.window.saturating_sub(in_flight.len());
        let sends = if pacing.every.is_some() {
            let sends = due.min(room);
            due -= sends;
            sends
        } else {
            room
        };
        for _ in 0..if stopping { 0 } else { sends } {
            let text = text(next, started);
            let data = SendMessage {
                to: &to,
                text: &text,
            };
            let frame = peer::event_frame(target, "sendMessage", &data, next);
            writer.send(Message::text(frame)).await?;
            in_flight.insert(next, Instant::now());
            next += 1;
        }
        if stopping && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            // A full window defers a due message; a saturated server sees
            // at most W waiting.
            _ = ticks.tick(), if pacing.every.is_some() && !stopping => due = (due + 1).min(pacing.window),
            incoming = peer::read(target, &mut reader, &mut writer) => {
                if let Incoming::Ack { id, ok } = incoming?
                    && let Some(sent) = in_flight.remove(&id)
                {
                    if ok {
                        result.acked.insert(id);
                        result.ack_latency.push(sent.elapsed().as_micros() as u64);
                    } else {
                        result.failed += 1;
                    }
                }
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                deadline = Some(tokio::time::Instant::now() + DRAIN);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    result.failed += in_flight.len() as u64;
    Ok(result)
}

async fn receive(
    target: Target,
    socket: peer::Socket,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<ReceiverResult> {
    let (mut writer, mut reader) = socket.split();
    let mut result = ReceiverResult {
        seen: Seqs::default(),
        duplicates: 0,
        delivery_latency: Latencies::default(),
    };
    let mut deadline = None;
    loop {
        tokio::select! {
            incoming = peer::read(target, &mut reader, &mut writer) => {
                if let Incoming::Push { event, data } = incoming? {
                    if event != "message" {
                        continue;
                    }
                    let Ok(message) = serde_json::from_str::<PushedMessage<'_>>(data.get()) else { continue };
                    let Some((seq, sent)) = message.text.split_once(':') else { continue };
                    let (Ok(seq), Ok(sent)) = (seq.parse::<u64>(), sent.parse::<u64>()) else { continue };
                    if seq > Seqs::MAX {
                        continue; // not a text this run sent
                    }
                    if result.seen.insert(seq) {
                        let now = started.elapsed().as_micros() as u64;
                        result.delivery_latency.push(now.saturating_sub(sent));
                    } else {
                        result.duplicates += 1;
                    }
                }
            }
            _ = stop.wait_for(|stop| *stop), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + DRAIN + Duration::from_secs(1));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_count_once_and_find_what_the_other_side_lacks() {
        let mut acked = Seqs::default();
        let mut seen = Seqs::default();
        for seq in [1, 2, 63, 64, 200] {
            assert!(acked.insert(seq));
        }
        assert!(!acked.insert(64), "64 is there already");
        assert_eq!(acked.len(), 5);
        for seq in [2, 64, 300] {
            seen.insert(seq);
        }
        // 1, 63 and 200 were acked but never seen; 300 was seen unasked.
        assert_eq!(acked.missing_from(&seen), 3);
        assert_eq!(seen.missing_from(&acked), 1);
    }
}
