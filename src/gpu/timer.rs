//! GPU timestamps around compute passes: per-kernel times for `ember bench --profile` and the
//! kernel bandwidth benchmark.

use super::{GpuContext, GpuError};

/// Up to `capacity` timed passes per submission.
pub struct PassTimer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    capacity: u32,
    used: u32,
    /// Marks written so far (in-pass timestamps).
    marks: u32,
}

/// The span of each mark from the one before it (the first from mark 0), for marks given as
/// [`PassTimer::finish_marks`] returns them.
pub fn intervals(ends: &[f64]) -> Vec<f64> {
    ends.iter().scan(0.0, |prev, &end| {
        let d = end - *prev;
        *prev = end;
        Some(d)
    }).collect()
}

impl PassTimer {
    /// None when the adapter has no TIMESTAMP_QUERY.
    pub fn new(ctx: &GpuContext, capacity: u32) -> Option<PassTimer> {
        if !ctx.has_timestamps() {
            return None;
        }
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("timestamps"), ty: wgpu::QueryType::Timestamp, count: 2 * capacity });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16 * capacity as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(PassTimer { queries, resolve, capacity, used: 0, marks: 0 })
    }

    /// A compute pass whose start and end are timestamped (slot = the pass's number).
    pub fn pass<'e>(&mut self, enc: &'e mut wgpu::CommandEncoder, label: &str) -> wgpu::ComputePass<'e> {
        assert!(self.used < self.capacity, "PassTimer: more than {} passes", self.capacity);
        let i = self.used;
        self.used += 1;
        enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.queries,
                beginning_of_pass_write_index: Some(2 * i),
                end_of_pass_write_index: Some(2 * i + 1),
            }),
        })
    }

    /// Writes timestamp number `i` inside a pass (needs [`GpuContext::has_timestamps_in_passes`];
    /// a timer of capacity c holds 2c of them). Read them with [`Self::finish_marks`].
    pub fn mark(&mut self, pass: &mut wgpu::ComputePass, i: u32) {
        assert!(i < 2 * self.capacity, "PassTimer: more than {} marks", 2 * self.capacity);
        pass.write_timestamp(&self.queries, i);
        self.marks = self.marks.max(i + 1);
    }

    /// Submits `enc` (after resolving its marks into it) and returns the nanoseconds from mark
    /// 0 to each later mark.
    pub fn finish_marks(&mut self, ctx: &GpuContext, mut enc: wgpu::CommandEncoder) -> Result<Vec<f64>, GpuError> {
        let n = std::mem::take(&mut self.marks);
        if n == 0 {
            ctx.submit_and_wait(enc)?;
            return Ok(Vec::new());
        }
        enc.resolve_query_set(&self.queries, 0..n, &self.resolve, 0);
        ctx.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = ctx.read(&self.resolve, n as usize)?;
        let period = ctx.queue.get_timestamp_period() as f64;
        Ok(ticks[1..].iter().map(|&t| t.saturating_sub(ticks[0]) as f64 * period).collect())
    }

    /// Submits `enc` (after resolving the timestamps into it) and returns each pass's duration
    /// in nanoseconds, in order; the timer is then ready for the next submission.
    pub fn finish(&mut self, ctx: &GpuContext, mut enc: wgpu::CommandEncoder) -> Result<Vec<f64>, GpuError> {
        let n = self.used;
        self.used = 0;
        if n == 0 {
            ctx.submit_and_wait(enc)?;
            return Ok(Vec::new());
        }
        enc.resolve_query_set(&self.queries, 0..2 * n, &self.resolve, 0);
        ctx.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = ctx.read(&self.resolve, 2 * n as usize)?;
        let period = ctx.queue.get_timestamp_period() as f64;
        Ok(ticks.chunks_exact(2).map(|t| t[1].saturating_sub(t[0]) as f64 * period).collect())
    }
}
