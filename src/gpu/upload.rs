//! Small host-to-GPU transfers that repeat every token, without `queue.write_buffer`.
//!
//! wgpu's `write_buffer` creates (and later destroys) a staging buffer per call and adds a
//! command buffer of its own to the next submission. The hybrid writes three small vectors per
//! layer and token that way, 96 calls a token for a 7B. An [`UploadSlot`] is instead a buffer
//! the host keeps mapped between uses: it is written in place, unmapped, and copied where the
//! kernels read it by a command buffer recorded beforehand; once that submission is done,
//! [`UploadSlot::remap`] maps it again in the background for the next use.

use super::{GpuContext, GpuError};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const UNMAPPED: u8 = 0;
const PENDING: u8 = 1;
const MAPPED: u8 = 2;
const FAILED: u8 = 3;

/// A buffer of `MAP_WRITE | COPY_SRC` usage, mapped for writing at creation and again after
/// each use.
pub struct UploadSlot {
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
}

impl UploadSlot {
    /// A slot of `size` bytes (counted in `ctx`'s memory), mapped and ready to write.
    pub fn new(ctx: &GpuContext, label: &str, size: u64) -> UploadSlot {
        UploadSlot { buffer: ctx.upload_buffer(label, size), state: Arc::new(AtomicU8::new(MAPPED)) }
    }

    /// The buffer, the source of the copies recorded for it.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Writes `parts` one after the other from offset 0, then unmaps the buffer: a command
    /// buffer copying from it may be submitted now. Waits, polling `device`, while the mapping
    /// asked for by [`remap`](Self::remap) is on its way (asking for it first if nobody did).
    pub fn write(&self, device: &wgpu::Device, parts: &[&[u8]]) -> Result<(), GpuError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total as u64 > self.buffer.size() {
            return Err(GpuError::Unsupported(format!("{total} bytes into an upload slot of {}", self.buffer.size())));
        }
        loop {
            match self.state.load(Ordering::Acquire) {
                MAPPED => break,
                UNMAPPED => self.remap(),
                PENDING => {
                    device.poll(wgpu::PollType::Poll).map_err(|e| GpuError::Lost(e.to_string()))?;
                    std::hint::spin_loop();
                }
                _ => return Err(GpuError::Lost("mapping an upload buffer failed".into())),
            }
        }
        {
            let mut view = self.buffer.slice(..).get_mapped_range_mut().map_err(|e| GpuError::Lost(e.to_string()))?;
            let mut at = 0;
            for p in parts {
                view.slice(at..at + p.len()).copy_from_slice(p);
                at += p.len();
            }
        }
        self.buffer.unmap();
        self.state.store(UNMAPPED, Ordering::Release);
        Ok(())
    }

    /// Asks for the buffer to be mapped again once the GPU is done with it (after the
    /// submission that copies from it); nothing if it is mapped or on its way.
    pub fn remap(&self) {
        if self.state.compare_exchange(UNMAPPED, PENDING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return;
        }
        let state = self.state.clone();
        self.buffer.slice(..).map_async(wgpu::MapMode::Write, move |r| {
            state.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
        });
    }
}
