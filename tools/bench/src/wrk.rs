//! One load step with wrk, and reading its report.

use anyhow::Context;
use pageviews_testbed::process::find_program;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    /// Responses wrk received in the run (it does not count those in flight when it stops).
    pub requests: u64,
    pub non_2xx: u64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl WrkResult {
    pub fn answered_2xx(&self) -> u64 {
        self.requests - self.non_2xx
    }

    pub fn errors(&self) -> u64 {
        self.non_2xx + self.socket_errors
    }
}

/// `GET url` with `connections` keep-alive connections for `secs` seconds. wrk does not
/// verify certificates, which suits the stack's self-signed one.
pub async fn run(url: &str, connections: u32, secs: u64) -> anyhow::Result<WrkResult> {
    let mut wrk = tokio::process::Command::new(find_program("wrk", &[], "wrk")?);
    wrk.args(["--latency", "--timeout", "5s"])
        .args(["-t", &connections.min(2).to_string()])
        .args(["-c", &connections.to_string()])
        .args(["-d", &format!("{secs}s"), url]);
    let text = super::output_of("wrk", &mut wrk).await?;
    parse(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

pub fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    let words = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    for line in text.lines().map(str::trim) {
        let w = words(line);
        match w.as_slice() {
            [p, latency] if p == "50%" => result.p50_ms = millis(latency)?,
            [p, latency] if p == "99%" => result.p99_ms = millis(latency)?,
            [n, r, ..] if r == "requests" => result.requests = n.parse()?,
            [label, rate] if label == "Requests/sec:" => result.requests_per_sec = rate.parse()?,
            _ if line.starts_with("Non-2xx or 3xx responses:") => {
                result.non_2xx = w.last().context("no count")?.parse()?;
            }
            _ if line.starts_with("Socket errors:") => {
                // "Socket errors: connect 0, read 1, write 0, timeout 2"
                result.socket_errors = w
                    .iter()
                    .skip(3)
                    .step_by(2)
                    .map(|n| n.trim_end_matches(',').parse::<u64>())
                    .sum::<Result<u64, _>>()?;
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        result.requests_per_sec > 0.0 || result.requests == 0,
        "no Requests/sec line"
    );
    Ok(result)
}

/// wrk prints latencies as e.g. `812.00us`, `4.20ms`, `1.02s`.
fn millis(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .context("latency without unit")?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        other => anyhow::bail!("unknown latency unit {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_report_with_errors() {
        let report = "Running 10s test @ https://localhost:8443/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    2.31ms  40.00ms   80.00%
    Req/Sec     3.20k   200.00     3.50k    70.00%
  Latency Distribution
     50%  812.00us
     75%    6.00ms
     90%    8.00ms
     99%    1.02s
  63912 requests in 10.00s, 120.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 4
  Non-2xx or 3xx responses: 12
Requests/sec:   6390.00
Transfer/sec:     12.00MB
";
        let r = parse(report).unwrap();
        assert_eq!(r.requests, 63912);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.socket_errors, 7);
        assert_eq!(r.errors(), 19);
        assert_eq!(r.answered_2xx(), 63900);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 1020.0).abs() < 1e-9);
        assert!((r.requests_per_sec - 6390.0).abs() < 1e-9);
    }
}
