//! The disk's flush latency, which every durable commit waits for: an 8 KB block written at
//! the same offset and `fdatasync`ed, over and over, as PostgreSQL flushes its WAL at each
//! commit, in the stack's directory (the database's disk). A flush that stalls stalls every
//! request whose row is in the batch being committed, so the stalls bound what a p99 can be.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A flush at least this long is counted as a stall.
pub const STALL: Duration = Duration::from_millis(50);

pub struct FlushLatency {
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Flushes of [`STALL`] or longer.
    pub stalls: usize,
}

/// Flushes for `secs` seconds (blocking: run it off the async runtime).
pub fn measure(dir: &Path, secs: f64) -> anyhow::Result<FlushLatency> {
    let path = dir.join("flush-probe");
    let file = std::fs::File::create(&path)?;
    let block = [0u8; 8192];
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        samples.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    samples.sort_unstable();
    let ms = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    Ok(FlushLatency {
        per_sec: samples.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        stalls: samples.iter().filter(|d| **d >= STALL).count(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn flushes_are_counted_in_order_and_the_probe_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("pageviews-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = super::measure(&dir, 0.2).unwrap();
        assert!(f.per_sec > 0.0);
        assert!(f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms && f.p99_ms <= f.max_ms);
        assert!(!dir.join("flush-probe").exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
