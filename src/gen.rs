//! `tally gen`: deterministic synthetic request events as NDJSON, with
//! optional steady clients and anomalies injected at known times; with
//! `--telemetry`, telemetry points of many series instead.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use tally_pipelines::synthetic::{Generator, GeneratorConfig, Injection, InjectionKind};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, MINUTE_MS};

#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Number of lines of the Zipf stream to write (steady clients and
    /// injections add theirs over the same span of event time).
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// Event-time span instead of --count, e.g. 2h: count = span x rate.
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<String>,
    /// Distinct clients (Zipf-distributed).
    #[arg(long, default_value_t = 10_000)]
    pub clients: u32,
    /// Distinct endpoint templates (Zipf-distributed).
    #[arg(long, default_value_t = 20)]
    pub endpoints: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Event time of the first event (RFC 3339 or epoch ms) [default: the
    /// minute that puts the last event at about now].
    #[arg(long)]
    pub start: Option<String>,
    /// Events per second of event time.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Zipf exponent over clients.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub late_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Also clients steady-0001, steady-0002, ... with a Poisson number of
    /// requests per minute each: known baselines to inject anomalies on.
    #[arg(long, default_value_t = 0)]
    pub steady_clients: u32,
    /// Mean requests per minute of each steady client.
    #[arg(long, default_value_t = 60.0)]
    pub steady_rate: f64,
    /// Inject an anomaly (repeatable):
    /// KIND:client=ID,at=TIME[,minutes=N][,size=X][,endpoint=PATH].
    /// KIND and the meaning of size: spike (x the client's normal rate),
    /// errors (fraction of its requests that fail with 5xx), latency
    /// (x its latencies), unusual-endpoint (requests a minute to a
    /// never-used endpoint), auth-burst (x 20 401/403 a minute),
    /// enumeration (x 10 never-seen endpoints a minute). TIME is RFC 3339,
    /// epoch ms, or +OFFSET from the start (e.g. +90m), rounded down to its
    /// minute. spike, errors and latency need a Zipf client (client-00001
    /// is the busiest) or a steady one.
    #[arg(long = "inject", value_name = "SPEC")]
    pub inject: Vec<String>,
    /// Write telemetry points instead of request events: `--count`
    /// points at `--rate` per second of event time, round-robin over
    /// `--series` series (`svc.latency{host=h-00001}`, ...), each a level
    /// of its own plus Gaussian noise, with a unique `point_id`.
    #[arg(long)]
    pub telemetry: bool,
    /// Distinct series of `--telemetry`.
    #[arg(long, default_value_t = 1_000)]
    pub series: u32,
    /// Output file [default: stdout].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &GenArgs) -> anyhow::Result<()> {
    let count = match &args.duration {
        Some(span) => {
            let span = humantime::parse_duration(span)
                .map_err(|e| anyhow::anyhow!("--duration {span:?}: {e}"))?;
            (span.as_secs_f64() * args.rate).round() as u64
        }
        None => args.count,
    };
    let start_ms = match &args.start {
        Some(s) => parse_instant(s).map_err(|e| anyhow::anyhow!("--start: {e}"))?,
        None => {
            let span_ms = (count as f64 * 1000.0 / args.rate.max(f64::MIN_POSITIVE)) as i64;
            let start = tally_state::retention::wall_clock_ms() - span_ms;
            // Whole minutes, so that `at=+30m` is a detector bucket.
            start - start.rem_euclid(MINUTE_MS)
        }
    };
    if args.telemetry {
        return write_points(args, start_ms, count, &mut output(args)?);
    }
    let injections = args
        .inject
        .iter()
        .map(|spec| {
            parse_injection(spec, start_ms).map_err(|e| anyhow::anyhow!("--inject {spec:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut generator = Generator::new(GeneratorConfig {
        seed: args.seed,
        clients: args.clients,
        endpoints: args.endpoints,
        start_ms,
        events_per_second: args.rate,
        zipf_exponent: args.zipf,
        duplicate_rate: args.duplicate_rate,
        late_rate: args.late_rate,
        malformed_rate: args.malformed_rate,
        steady_clients: args.steady_clients,
        steady_per_minute: args.steady_rate,
        injections,
    })?;
    let end_ms = start_ms + (count as f64 * 1000.0 / args.rate) as i64;
    for p in generator.injection_plan() {
        let i = &p.injection;
        let mut what = format!(
            "injection {}: {} on {} from {} for {} min, size {}",
            p.index,
            i.kind,
            i.client,
            format_rfc3339_ms(i.at_ms),
            i.minutes,
            i.size
        );
        if p.added_per_minute > 0 {
            what.push_str(&format!(", +{} events/min", p.added_per_minute));
        }
        if let Some(e) = &p.endpoint {
            what.push_str(&format!(" to {e}"));
        }
        if i.at_ms >= end_ms {
            what.push_str(" (after the last event: not generated)");
        }
        eprintln!("{what}");
    }
    let mut out = output(args)?;
    let mut line = String::with_capacity(512);
    while generator.base_lines() < count {
        line.clear();
        generator.next_line(&mut line);
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn output(args: &GenArgs) -> anyhow::Result<BufWriter<Box<dyn Write>>> {
    let out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    Ok(BufWriter::with_capacity(1 << 20, out))
}

/// `count` telemetry points from `start_ms` (see `--telemetry`).
fn write_points(
    args: &GenArgs,
    start_ms: i64,
    count: u64,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let series = u64::from(args.series.max(1));
    let mut state = args.seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let step_ms = 1000.0 / args.rate.max(f64::MIN_POSITIVE);
    for i in 0..count {
        let k = i % series + 1;
        // Box-Muller: standard normal noise around a level of the series'
        // own (10..=1000).
        let (u1, u2) = (next().max(1e-300), next());
        let noise = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let level = 10.0 + (k % 100) as f64 * 10.0;
        let ts = start_ms + (i as f64 * step_ms) as i64;
        writeln!(
            out,
            "{{\"series\":\"svc.latency\",\"tags\":{{\"host\":\"h-{k:05}\"}},\"timestamp\":{ts},\"value\":{},\"point_id\":\"{}-{i}\"}}",
            level + noise * level / 10.0,
            args.seed
        )?;
    }
    out.flush()?;
    Ok(())
}

/// `KIND:client=ID,at=TIME[,minutes=N][,size=X][,endpoint=PATH]`; a
/// relative `at` (`+90m`) counts from `start_ms`. `at` is rounded down to
/// its minute, so that every injected minute is one detector bucket.
fn parse_injection(spec: &str, start_ms: i64) -> Result<Injection, String> {
    let (kind, rest) = spec
        .split_once(':')
        .ok_or("expected KIND:client=ID,at=TIME[,minutes=N][,size=X][,endpoint=PATH]")?;
    let kind: InjectionKind = kind.trim().parse()?;
    let (mut client, mut at_ms, mut minutes, mut size, mut endpoint) =
        (None, None, 1u32, kind.default_size(), None);
    for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let value = value.trim();
        match key.trim() {
            "client" => client = Some(value.to_string()),
            "at" => at_ms = Some(parse_at(value, start_ms)?),
            "minutes" => {
                minutes = value
                    .parse()
                    .map_err(|_| format!("minutes={value:?} is not a whole number"))?
            }
            "size" => {
                size = value
                    .parse()
                    .map_err(|_| format!("size={value:?} is not a number"))?
            }
            "endpoint" => endpoint = Some(value.to_string()),
            other => {
                return Err(format!(
                    "unknown key {other:?}; expected client, at, minutes, size or endpoint"
                ))
            }
        }
    }
    let client = client.ok_or("client=ID is required")?;
    let at_ms = at_ms.ok_or("at=TIME is required")?;
    Ok(Injection {
        endpoint,
        ..Injection::new(kind, &client, at_ms, minutes, size)
    })
}

fn parse_at(value: &str, start_ms: i64) -> Result<i64, String> {
    let at = match value.strip_prefix('+') {
        Some(offset) => {
            let offset = humantime::parse_duration(offset)
                .map_err(|e| format!("at=+{offset:?} is not an offset such as +90m ({e})"))?;
            i64::try_from(offset.as_millis())
                .ok()
                .and_then(|ms| start_ms.checked_add(ms))
                .ok_or_else(|| format!("at={value} is too far"))?
        }
        None => parse_instant(value).map_err(|e| format!("at: {e}"))?,
    };
    Ok(at - at.rem_euclid(MINUTE_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-02T00:00:00Z.
    const START: i64 = 1_772_409_600_000;

    #[test]
    fn specs_parse_with_defaults_offsets_and_absolute_times() {
        let i =
            parse_injection("spike:client=client-00001,at=+90m,minutes=2,size=30", START).unwrap();
        assert_eq!(
            i,
            Injection::new(
                InjectionKind::RequestSpike,
                "client-00001",
                START + 90 * 60_000,
                2,
                30.0
            )
        );
        // Defaults: one minute, the kind's size; at rounded down to 10:00.
        let i = parse_injection(
            "unusual-endpoint: client=steady-0001, at=2026-03-02T10:00:59Z, endpoint=/admin",
            START,
        )
        .unwrap();
        assert_eq!(i.at_ms, START + 10 * 3_600_000);
        assert_eq!((i.minutes, i.size), (1, 10.0));
        assert_eq!(i.endpoint.as_deref(), Some("/admin"));
        let i = parse_injection("auth-burst:client=x,at=1772409660000", START).unwrap();
        assert_eq!((i.at_ms, i.size), (START + 60_000, 2.0));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, reason) in [
            ("spike", "expected KIND:"),
            ("surge:client=a,at=+1m", "unknown injection kind"),
            ("spike:client=a", "at=TIME is required"),
            ("spike:at=+1m", "client=ID is required"),
            ("spike:client=a,at=+1m,size=big", "not a number"),
            ("spike:client=a,at=+1m,minutes=-1", "not a whole number"),
            ("spike:client=a,at=soon", "neither RFC 3339"),
            ("spike:client=a,at=+1fortnight", "not an offset"),
            ("spike:client=a,at=+1m,colour=red", "unknown key"),
            ("spike:client=a,at=+1m,minutes", "not key=value"),
        ] {
            let e = parse_injection(spec, START).unwrap_err();
            assert!(e.contains(reason), "{spec}: {e}");
        }
    }
}
