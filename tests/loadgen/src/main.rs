//! Load generator for the sockets host and its Socket.IO peer. Every run is
//! bounded (count and time) and prints one JSON object; `scripts/bench.sh`
//! runs them side by side against both servers.
//!
//! ```sh
//! loadgen --target sockets --server 127.0.0.1:8080 chat --pairs 16 --window 8 --duration 10 --server-pid PID
//! loadgen --target socketio --server 127.0.0.1:8090 idle --connections 19000 --server-pid PID
//! loadgen --target sockets --server 127.0.0.1:8080 fanout --users 100 --events 20000
//! loadgen --server 127.0.0.1:8080 edge --uploads 40 --slow 300 --duration 10 --server-pid PID
//! loadgen broker --amqp amqp://guest:guest@127.0.0.1:5672/%2f --events 10000 --rate 2500
//! loadgen users-file --pairs 16 > users.json
//! perf report --stdio -g none -t $'\t' -F overhead,sample,comm,dso,sym | loadgen profile-shares
//! loadgen check-results target/bench/results.jsonl
//! ```

#![forbid(unsafe_code)]

mod broker;
mod chat;
mod edge;
mod fanout;
mod idle;
mod peer;
mod profile;
mod relay;
mod results;
mod server;
mod stats;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use peer::Target;

#[derive(Parser)]
#[command(about = "Bounded load runs against the sockets host or its Socket.IO peer")]
struct Cli {
    /// Which protocol the server speaks.
    #[arg(long, value_enum, default_value = "sockets", global = true)]
    target: Target,
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    server: SocketAddr,
    /// HS256 secret the server verifies tokens with.
    #[arg(
        long,
        env = "SOCKETS_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    secret: Option<String>,
    #[command(subcommand)]
    run: Run,
}

#[derive(Subcommand)]
enum Run {
    /// Student/consultant pairs exchanging `sendMessage`.
    Chat {
        #[arg(long, default_value_t = 16)]
        pairs: usize,
        /// Messages in flight per student.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Seconds of sending (at most 300).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Messages per second over all pairs (open loop); default: as
        /// fast as acks come back.
        #[arg(long)]
        rate: Option<f64>,
        /// The server's process id: adds its CPU time per delivered
        /// message (from /proc) to the summary.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Authenticated idle connections: connect rate, server memory.
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// The server's process id (its memory is read from /proc).
        #[arg(long)]
        server_pid: u32,
    },
    /// Backend events through the HTTP API to connected users.
    Fanout {
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Publish to this RabbitMQ instead of the HTTP API (the sockets
        /// host only).
        #[arg(long)]
        amqp: Option<String>,
        /// The exchange the host consumes from.
        #[arg(long, default_value = "sockets.events")]
        exchange: String,
        /// Give every event an idempotency key (HTTP `id`, AMQP
        /// `message_id`), unique to this run: what exactly once costs.
        #[arg(long)]
        keyed: bool,
    },
    /// The edge under attack: normal clients' round trips and the server's
    /// memory alone, then during unauthenticated 16 MiB uploads and
    /// sockets that never finish their headers.
    Edge {
        /// Concurrent unauthenticated uploads (at most 400).
        #[arg(long, default_value_t = 40)]
        uploads: usize,
        /// Slow-header sockets held (at most 5000).
        #[arg(long, default_value_t = 300)]
        slow: usize,
        /// Normal clients measuring round trips.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds of each phase (at most 60).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// The server's process id (its memory is read from /proc).
        #[arg(long)]
        server_pid: u32,
    },
    /// RabbitMQ alone: the fanout's publishes to a quorum queue of the
    /// run's own, consumed and acked by a plain consumer (no server).
    Broker {
        /// The RabbitMQ to measure.
        #[arg(long)]
        amqp: String,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Unacknowledged messages the consumer may hold (the host's
        /// default prefetch).
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
    },
    /// Serves the chat protocol with nothing behind it (no plugins, no
    /// log): the limit the host's figures are compared with. Runs until
    /// SIGTERM or ctrl-c; needs the secret.
    Relay {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:18095")]
        listen: SocketAddr,
        /// The users file (`loadgen users-file`).
        #[arg(long)]
        users: std::path::PathBuf,
    },
    /// Prints a users file with the chat run's users (`bench_s_N`,
    /// `bench_c_N`) for the servers' directories.
    UsersFile {
        #[arg(long, default_value_t = 16)]
        pairs: usize,
    },
    /// Sums a `perf report` of the server read from stdin (tab-separated
    /// `overhead,sample,comm,dso,sym` rows) into shares of its samples by
    /// thread, by kind of code and for the WASM routing
    /// (`scripts/profile.sh`).
    ProfileShares {
        /// The file name perf gives the host's executable.
        #[arg(long, default_value = "sockets-host")]
        host_binary: String,
    },
    /// Checks a results file of `scripts/bench.sh`: fails, naming the
    /// runs, when any run lost, duplicated, failed or refused something.
    CheckResults {
        /// The results file (one JSON object per line).
        file: std::path::PathBuf,
    },
}

/// How a `fanout` or `broker` run publishes.
#[derive(clap::Args)]
struct ScheduleArgs {
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Publishes in flight: HTTP requests or unconfirmed AMQP publishes.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Events per second (published on a fixed schedule); default: as
    /// fast as the concurrency allows.
    #[arg(long)]
    rate: Option<f64>,
}

impl From<ScheduleArgs> for fanout::Schedule {
    fn from(args: ScheduleArgs) -> Self {
        Self::new(args.events, args.concurrency, args.rate)
    }
}

/// Mints the tokens a run connects with.
pub struct Tokens {
    key: jsonwebtoken::EncodingKey,
}

impl Tokens {
    /// An HS256 token for `sub`/`role`, valid for an hour.
    pub fn mint(&self, sub: &str, role: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + 3600;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": sub, "role": role, "exp": exp}),
            &self.key,
        )
        .expect("an HS256 token encodes")
    }
}

/// The source address of the `n`th connection: spread over 127.0.0.1–16 so
/// that no single address runs out of ephemeral ports.
pub fn source_address(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (n % 16) as u8))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tokens = || -> anyhow::Result<Tokens> {
        let secret = cli
            .secret
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--secret or SOCKETS_JWT_SECRET is required"))?;
        Ok(Tokens {
            key: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        })
    };
    let summary = match cli.run {
        Run::Chat {
            pairs,
            window,
            duration,
            rate,
            server_pid,
        } => {
            let options = chat::Options {
                target: cli.target,
                server: cli.server,
                pairs,
                window: window.max(1),
                duration: Duration::from_secs(duration.clamp(1, 300)),
                rate: rate.filter(|rate| *rate > 0.0),
                server_pid,
            };
            chat::run(options, &tokens()?).await?
        }
        Run::Idle {
            connections,
            in_flight,
            server_pid,
        } => {
            let options = idle::Options {
                target: cli.target,
                server: cli.server,
                connections,
                in_flight,
                server_pid,
            };
            idle::run(options, &tokens()?).await?
        }
        Run::Fanout {
            users,
            schedule,
            amqp,
            exchange,
            keyed,
        } => {
            anyhow::ensure!(
                amqp.is_none() || cli.target == Target::Sockets,
                "--amqp: only the sockets host consumes from RabbitMQ"
            );
            let options = fanout::Options {
                target: cli.target,
                server: cli.server,
                users: users.max(1),
                schedule: schedule.into(),
                amqp: amqp.map(|url| fanout::Amqp { url, exchange }),
                keys: keyed.then(fanout::run_key_prefix),
            };
            fanout::run(options, &tokens()?).await?
        }
        Run::Edge {
            uploads,
            slow,
            clients,
            duration,
            server_pid,
        } => {
            anyhow::ensure!(cli.target == Target::Sockets, "edge: the sockets host only");
            let options = edge::Options {
                server: cli.server,
                server_pid,
                uploads: uploads.min(400),
                slow: slow.min(5000),
                clients: clients.max(1),
                duration: Duration::from_secs(duration.clamp(1, 60)),
            };
            edge::run(options, &tokens()?).await?
        }
        Run::Broker {
            amqp,
            schedule,
            prefetch,
        } => {
            let options = broker::Options {
                url: amqp,
                schedule: schedule.into(),
                prefetch: prefetch.max(1),
            };
            broker::run(options).await?
        }
        Run::Relay { listen, users } => {
            let options = relay::Options {
                listen,
                secret: cli.secret.clone().context("the relay needs --secret")?,
                users,
            };
            relay::run(options).await?
        }
        Run::UsersFile { pairs } => {
            let users: Vec<_> = (0..pairs)
                .flat_map(|pair| {
                    [
                        json!({"id": format!("bench_s_{pair}"), "role": "student"}),
                        json!({"id": format!("bench_c_{pair}"), "role": "consultant"}),
                    ]
                })
                .collect();
            json!(users)
        }
        Run::ProfileShares { host_binary } => {
            profile::summarize_report(std::io::stdin().lock(), &host_binary)?
        }
        Run::CheckResults { file } => {
            let opened = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let verdict = results::check(std::io::BufReader::new(opened))?;
            println!("{}", verdict.summary());
            anyhow::ensure!(verdict.runs > 0, "{}: no run summaries", file.display());
            anyhow::ensure!(
                verdict.passed(),
                "{}: {} problems (lost, duplicated, failed or refused) in {} runs",
                file.display(),
                verdict.problems.len(),
                verdict.runs
            );
            return Ok(());
        }
    };
    println!("{summary}");
    Ok(())
}
