//! Counters every mirror keeps: faults by size, retries, invalidations by reason, bytes mapped,
//! and a fault-latency histogram.
//!
//! One [`Counters`] lives in each backend's mirror and is updated with relaxed atomics from any
//! thread, callbacks included (recording never sleeps, never allocates and never takes a lock, so
//! it is allowed in atomic sections). Readers take a [`CounterSnapshot`]; the fields of one
//! snapshot are read one by one, so a snapshot taken while faults run may be off by the few events
//! in flight, never more.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::range::Event;

/// Size classes of resolved faults, by the bytes one fault mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultSize {
    /// At most 4 KiB.
    Page4K,
    /// More than 4 KiB, at most 64 KiB.
    UpTo64K,
    /// More than 64 KiB, at most 2 MiB.
    UpTo2M,
    /// More than 2 MiB, at most 1 GiB.
    UpTo1G,
    /// More than 1 GiB.
    Larger,
}

impl FaultSize {
    /// Number of size classes.
    pub const COUNT: usize = 5;
    /// Every class, smallest first.
    pub const ALL: [FaultSize; Self::COUNT] = [
        FaultSize::Page4K,
        FaultSize::UpTo64K,
        FaultSize::UpTo2M,
        FaultSize::UpTo1G,
        FaultSize::Larger,
    ];

    /// The class of a fault that mapped `bytes`.
    pub const fn of(bytes: u64) -> FaultSize {
        match bytes {
            0..=4096 => FaultSize::Page4K,
            4097..=65536 => FaultSize::UpTo64K,
            65537..=0x20_0000 => FaultSize::UpTo2M,
            0x20_0001..=0x4000_0000 => FaultSize::UpTo1G,
            _ => FaultSize::Larger,
        }
    }

    /// A short label: `4K`, `≤64K`, `≤2M`, `≤1G`, `>1G`.
    pub const fn label(self) -> &'static str {
        match self {
            FaultSize::Page4K => "4K",
            FaultSize::UpTo64K => "≤64K",
            FaultSize::UpTo2M => "≤2M",
            FaultSize::UpTo1G => "≤1G",
            FaultSize::Larger => ">1G",
        }
    }
}

/// Event kind names, indexed like [`Event::index`] (the same as [`Event::NAMES`]).
pub const EVENT_NAMES: [&str; Event::KINDS] = Event::NAMES;

/// Buckets of the latency histogram: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns
/// (bucket 0 also counts 0 ns); the last bucket counts everything from about 9 s up.
pub const LATENCY_BUCKETS: usize = 34;

/// The live counters of one mirror. See the [module documentation](self).
#[derive(Debug)]
pub struct Counters {
    faults: [AtomicU64; FaultSize::COUNT],
    fault_bytes: AtomicU64,
    retries: AtomicU64,
    invalidations: [AtomicU64; Event::KINDS],
    skipped: [AtomicU64; Event::KINDS],
    invalidated_bytes: AtomicU64,
    mapped: AtomicU64,
    unmapped: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            faults: std::array::from_fn(|_| AtomicU64::new(0)),
            fault_bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            invalidations: std::array::from_fn(|_| AtomicU64::new(0)),
            skipped: std::array::from_fn(|_| AtomicU64::new(0)),
            invalidated_bytes: AtomicU64::new(0),
            mapped: AtomicU64::new(0),
            unmapped: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    /// Records one resolved fault that mapped `bytes`, taking `latency` from the device's
    /// request to the mapping being in place.
    pub fn record_fault(&self, bytes: u64, latency: Duration) {
        self.faults[FaultSize::of(bytes) as usize].fetch_add(1, Relaxed);
        self.fault_bytes.fetch_add(bytes, Relaxed);
        self.latency[bucket(latency)].fetch_add(1, Relaxed);
    }

    /// Records one fault loop started over because an invalidation raced it.
    pub fn record_retry(&self) {
        self.record_retries(1);
    }

    /// Records `n` fault loops started over because an invalidation raced them.
    pub fn record_retries(&self, n: u64) {
        self.retries.fetch_add(n, Relaxed);
    }

    /// Records one invalidation callback for `event` over `bytes` of the subscription: `acted`
    /// when the mirror changed its page table, `false` when the reason let it skip the event.
    pub fn record_invalidation(&self, event: &Event, bytes: u64, acted: bool) {
        let i = event.index();
        if acted {
            self.invalidations[i].fetch_add(1, Relaxed);
            self.invalidated_bytes.fetch_add(bytes, Relaxed);
        } else {
            self.skipped[i].fetch_add(1, Relaxed);
        }
    }

    /// Records `bytes` newly mapped for the device.
    pub fn record_map(&self, bytes: u64) {
        self.mapped.fetch_add(bytes, Relaxed);
    }

    /// Records `bytes` of device mappings torn down.
    pub fn record_unmap(&self, bytes: u64) {
        self.unmapped.fetch_add(bytes, Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let load = |a: &AtomicU64| a.load(Relaxed);
        CounterSnapshot {
            faults: self.faults.each_ref().map(load),
            fault_bytes: load(&self.fault_bytes),
            retries: load(&self.retries),
            invalidations: self.invalidations.each_ref().map(load),
            skipped: self.skipped.each_ref().map(load),
            invalidated_bytes: load(&self.invalidated_bytes),
            bytes_mapped: load(&self.mapped),
            bytes_unmapped: load(&self.unmapped),
            fault_latency: LatencyHistogram {
                buckets: self.latency.each_ref().map(load),
            },
        }
    }
}

fn bucket(latency: Duration) -> usize {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

/// The counters of one mirror at one moment. Plain data: subtract two snapshots with
/// [`since`](Self::since) to see what one phase did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Resolved faults, by [`FaultSize`] (index with `FaultSize as usize`).
    pub faults: [u64; FaultSize::COUNT],
    /// Bytes mapped by resolved faults.
    pub fault_bytes: u64,
    /// Fault loops started over because an invalidation raced them.
    pub retries: u64,
    /// Invalidations acted on, by [`Event::index`] (names in [`EVENT_NAMES`]).
    pub invalidations: [u64; Event::KINDS],
    /// Invalidations skipped because of their reason (own migration, soft-dirty), by kind.
    pub skipped: [u64; Event::KINDS],
    /// Bytes covered by the invalidations acted on.
    pub invalidated_bytes: u64,
    /// Bytes mapped for the device (by faults, prefetches, migrations).
    pub bytes_mapped: u64,
    /// Bytes of device mappings torn down.
    pub bytes_unmapped: u64,
    /// Fault latencies.
    pub fault_latency: LatencyHistogram,
}

impl CounterSnapshot {
    /// Resolved faults of every size.
    pub fn total_faults(&self) -> u64 {
        self.faults.iter().sum()
    }

    /// Invalidations acted on, of every kind.
    pub fn total_invalidations(&self) -> u64 {
        self.invalidations.iter().sum()
    }

    /// Adds `other` to `self`: the counters of several mirrors of one device (a device with
    /// one mirror per IOVA window, say) as one.
    pub fn add(&mut self, other: &CounterSnapshot) {
        let arr = |a: &mut [u64], b: &[u64]| {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.saturating_add(*y);
            }
        };
        arr(&mut self.faults, &other.faults);
        arr(&mut self.invalidations, &other.invalidations);
        arr(&mut self.skipped, &other.skipped);
        arr(
            &mut self.fault_latency.buckets,
            &other.fault_latency.buckets,
        );
        self.fault_bytes = self.fault_bytes.saturating_add(other.fault_bytes);
        self.retries = self.retries.saturating_add(other.retries);
        self.invalidated_bytes = self
            .invalidated_bytes
            .saturating_add(other.invalidated_bytes);
        self.bytes_mapped = self.bytes_mapped.saturating_add(other.bytes_mapped);
        self.bytes_unmapped = self.bytes_unmapped.saturating_add(other.bytes_unmapped);
    }

    /// What happened between `earlier` and `self` (counters saturate at 0 if `earlier` is not
    /// earlier).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let sub = |a: u64, b: u64| a.saturating_sub(b);
        let arr = |a: &[u64], b: &[u64], out: &mut [u64]| {
            for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                *o = sub(*x, *y);
            }
        };
        let mut d = CounterSnapshot {
            fault_bytes: sub(self.fault_bytes, earlier.fault_bytes),
            retries: sub(self.retries, earlier.retries),
            invalidated_bytes: sub(self.invalidated_bytes, earlier.invalidated_bytes),
            bytes_mapped: sub(self.bytes_mapped, earlier.bytes_mapped),
            bytes_unmapped: sub(self.bytes_unmapped, earlier.bytes_unmapped),
            ..CounterSnapshot::default()
        };
        arr(&self.faults, &earlier.faults, &mut d.faults);
        arr(
            &self.invalidations,
            &earlier.invalidations,
            &mut d.invalidations,
        );
        arr(&self.skipped, &earlier.skipped, &mut d.skipped);
        arr(
            &self.fault_latency.buckets,
            &earlier.fault_latency.buckets,
            &mut d.fault_latency.buckets,
        );
        d
    }
}

/// A log2 histogram of latencies (see [`LATENCY_BUCKETS`]). Quantiles are reported as the
/// geometric middle of their bucket, so they are within a factor of √2 of the true value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Count per bucket.
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
        }
    }
}

impl LatencyHistogram {
    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The latency below which a fraction `q` (0.0 to 1.0) of the recorded ones lie; `None` when
    /// nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let mid = (1u64 << i) as f64 * std::f64::consts::SQRT_2;
                return Some(Duration::from_nanos(mid as u64));
            }
        }
        None
    }

    /// The median latency.
    pub fn median(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    /// The 99th-percentile latency.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::Owner;

    #[test]
    fn faults_are_classed_by_size() {
        let c = Counters::default();
        c.record_fault(4096, Duration::from_micros(3));
        c.record_fault(8192, Duration::from_micros(3));
        c.record_fault(2 << 20, Duration::from_micros(3));
        c.record_fault((2 << 20) + 4096, Duration::from_micros(3));
        c.record_fault(2 << 30, Duration::from_micros(3));
        let s = c.snapshot();
        assert_eq!(s.faults, [1, 1, 1, 1, 1]);
        assert_eq!(
            s.fault_bytes,
            4096 + 8192 + (2 << 20) * 2 + 4096 + (2 << 30)
        );
        assert_eq!(s.total_faults(), 5);
    }

    #[test]
    fn invalidations_are_counted_by_reason_and_skips_apart() {
        let c = Counters::default();
        c.record_invalidation(&Event::Unmap, 4096, true);
        c.record_invalidation(&Event::Unmap, 8192, true);
        c.record_invalidation(&Event::Migrate { owner: Owner(1) }, 4096, false);
        let s = c.snapshot();
        assert_eq!(s.invalidations[Event::Unmap.index()], 2);
        assert_eq!(s.invalidated_bytes, 12288);
        assert_eq!(s.skipped[Event::Migrate { owner: Owner(1) }.index()], 1);
        assert_eq!(s.total_invalidations(), 2);
        assert_eq!(EVENT_NAMES[Event::Unmap.index()], "unmap");
        assert_eq!(
            EVENT_NAMES[Event::Exclusive { owner: Owner(1) }.index()],
            "exclusive"
        );
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let c = Counters::default();
        for _ in 0..98 {
            c.record_fault(4096, Duration::from_micros(10)); // bucket 13: [8192, 16384) ns
        }
        c.record_fault(4096, Duration::from_millis(1)); // bucket 19
        c.record_fault(4096, Duration::from_millis(1));
        let h = c.snapshot().fault_latency;
        assert_eq!(h.count(), 100);
        let med = h.median().unwrap();
        assert!((8192..16384).contains(&(med.as_nanos() as u64)), "{med:?}");
        let p99 = h.p99().unwrap();
        assert!(
            (1 << 19..1 << 20).contains(&(p99.as_nanos() as u64)),
            "{p99:?}"
        );
        assert_eq!(LatencyHistogram::default().median(), None);
    }

    #[test]
    fn since_subtracts_and_huge_latencies_go_to_the_last_bucket() {
        let c = Counters::default();
        c.record_map(4096);
        let a = c.snapshot();
        c.record_map(8192);
        c.record_unmap(4096);
        c.record_retry();
        c.record_fault(4096, Duration::from_secs(100_000));
        let d = c.snapshot().since(&a);
        assert_eq!(d.bytes_mapped, 8192);
        assert_eq!(d.bytes_unmapped, 4096);
        assert_eq!(d.retries, 1);
        assert_eq!(d.fault_latency.buckets[LATENCY_BUCKETS - 1], 1);
        assert_eq!(a.since(&c.snapshot()).bytes_mapped, 0);
    }

    #[test]
    fn add_sums_every_counter_and_undoes_since() {
        let a = Counters::default();
        a.record_fault(4096, Duration::from_micros(3));
        a.record_invalidation(&Event::Unmap, 4096, true);
        a.record_map(4096);
        let b = Counters::default();
        b.record_fault(2 << 20, Duration::from_micros(40));
        b.record_retry();
        b.record_unmap(8192);
        let mut sum = a.snapshot();
        sum.add(&b.snapshot());
        assert_eq!(sum.total_faults(), 2);
        assert_eq!(sum.fault_bytes, 4096 + (2 << 20));
        assert_eq!(sum.retries, 1);
        assert_eq!(sum.total_invalidations(), 1);
        assert_eq!(sum.bytes_mapped, 4096);
        assert_eq!(sum.bytes_unmapped, 8192);
        assert_eq!(sum.fault_latency.count(), 2);
        assert_eq!(sum.since(&b.snapshot()), a.snapshot());
    }
}
