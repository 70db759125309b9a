//! One GPU context per process: the adapter, device and queue, the features and limits ember
//! asked for, and a cache of compiled pipelines.

use super::{GpuError, ShaderSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What ember knows about one adapter, for `ember devices` and for choosing.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub has_f16: bool,
    pub has_subgroups: bool,
    pub has_timestamps: bool,
    pub max_storage_binding: u64,
}

impl AdapterSummary {
    /// Software rasterisers (lavapipe, WARP, SwiftShader) and GL adapters are usable for tests
    /// but not for speed.
    pub fn is_software(&self) -> bool {
        self.device_type == wgpu::DeviceType::Cpu
    }

    pub fn is_gl(&self) -> bool {
        self.backend == wgpu::Backend::Gl
    }

    fn rank(&self) -> u32 {
        match (self.is_gl(), self.device_type) {
            (false, wgpu::DeviceType::DiscreteGpu) => 0,
            (false, wgpu::DeviceType::IntegratedGpu) => 1,
            (false, wgpu::DeviceType::VirtualGpu) => 2,
            (false, wgpu::DeviceType::Other) => 3,
            (false, wgpu::DeviceType::Cpu) => 4,
            (true, _) => 5,
        }
    }
}

/// Which adapter to open.
#[derive(Clone, Debug, Default)]
pub enum DeviceChoice {
    /// The best hardware GPU (discrete first); software adapters only when `allow_software`.
    #[default]
    Best,
    /// The best adapter, software ones allowed (tests on lavapipe, `--backend gpu`).
    BestOrSoftware,
    /// `ember devices`' index.
    Index(usize),
    /// The first adapter whose name contains this text (case-insensitive).
    Name(String),
}

impl std::str::FromStr for DeviceChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<usize>() {
            Ok(i) => DeviceChoice::Index(i),
            Err(_) => DeviceChoice::Name(s.to_string()),
        })
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor { backends, ..wgpu::InstanceDescriptor::new_without_display_handle() })
}

/// Vulkan, Metal and DX12 adapters; only when there are none, OpenGL ones (probing GL first
/// would print EGL noise on machines that do not need it).
fn enumerate() -> Vec<wgpu::Adapter> {
    let primary = pollster::block_on(instance(wgpu::Backends::PRIMARY).enumerate_adapters(wgpu::Backends::PRIMARY));
    if !primary.is_empty() {
        return primary;
    }
    pollster::block_on(instance(wgpu::Backends::GL).enumerate_adapters(wgpu::Backends::GL))
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let f = a.features();
    AdapterSummary {
        index,
        name: info.name,
        backend: info.backend,
        device_type: info.device_type,
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        has_f16: f.contains(wgpu::Features::SHADER_F16),
        has_subgroups: f.contains(wgpu::Features::SUBGROUP),
        has_timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        max_storage_binding: a.limits().max_storage_buffer_binding_size,
    }
}

/// Whether shaders/matmul_coop.wgsl can run on this adapter: cooperative matrices of 16x16x16
/// f16 accumulating in f32 (the only shape it uses), f16 and subgroups in shaders, subgroups
/// of exactly 32 invocations (it maps 8 subgroups onto its 256 threads) and the 35 KiB of
/// shared memory it takes.
fn coop_matrix_usable(adapter: &wgpu::Adapter, limits: &wgpu::Limits) -> bool {
    use wgpu::CooperativeScalarType as T;
    let need = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
    let info = adapter.get_info();
    adapter.features().contains(need)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && limits.max_compute_workgroup_storage_size >= 36 * 1024
        && limits.max_compute_invocations_per_workgroup >= 256
        && adapter.cooperative_matrix_properties().iter().any(|p| (p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type) == (16, 16, 16, T::F16, T::F32))
}

/// Every adapter wgpu finds, in a stable order (the indices `--device N` refers to).
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate().iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}

/// The device and everything created once per process.
pub struct GpuContext {
    pub adapter: AdapterSummary,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// The kernels' measured choices, passed in by the caller ([`GpuContext::with_tuning`]).
    pub tuning: super::GpuTuning,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Bytes of every buffer created through this context (weights, caches, scratch, uniforms),
    /// so that a VRAM budget can be checked against what was really allocated. Buffers are
    /// never subtracted when dropped: the count is an upper bound of what lives.
    allocated: AtomicU64,
    /// The one staging buffer every upload goes through (created at the first upload, kept).
    staging: Mutex<Staging>,
    /// The most the memory allocator under wgpu has held (its blocks, staging included), as
    /// sampled at each staging flush and each [`GpuContext::memory`] call; 0 where the backend
    /// gives no report.
    reserved_peak: AtomicU64,
    /// What the allocator held before ember created anything (wgpu's own buffers).
    base_reserved: u64,
}

/// Bytes of the staging buffer uploads go through (see [`GpuContext::write`]).
pub const STAGING_CAP: u64 = 4 << 20;

/// The upload staging buffer and its state.
#[derive(Default)]
struct Staging {
    buffer: Option<wgpu::Buffer>,
    /// Mapped for writing (at creation, or after the last copies out of it finished).
    mapped: bool,
    /// Bytes of it filled since it was mapped.
    fill: u64,
    /// The copies out of it, recorded while it is mapped, submitted once it is unmapped.
    encoder: Option<wgpu::CommandEncoder>,
}
/// Sub-allocation blocks for device-local memory grow from the first to the second size
/// (buffers larger than the block get their own allocation); host-visible blocks are half as
/// large (wgpu's rule, at least 4 MiB). wgpu's default (128-256 MiB blocks) can leave a quarter
/// GiB reserved and unused per memory type, which a VRAM budget of a few GiB cannot afford;
/// larger buffers (weights, KV caches) get their own allocations either way.
const DEVICE_BLOCK: std::ops::Range<u64> = (4 << 20)..(8 << 20);
const HOST_BLOCK_MAX: u64 = 4 << 20;

/// What the allocator may hold beyond ember's buffers whatever the device (the upload
/// staging, the unused room of a device block and of two host-visible blocks): the margin a
/// placement made before anything is uploaded keeps (`ember plan`, the hybrid's choice of
/// host-attention layers); [`GpuContext::headroom_bytes`] adds wgpu's own buffers to it.
pub const PLANNING_MARGIN: u64 = STAGING_CAP + DEVICE_BLOCK.end + 2 * HOST_BLOCK_MAX;

/// GPU memory of one context: what ember counted and what the allocator under wgpu holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuMemory {
    /// Bytes of the buffers ember created, its upload staging buffer included (never reduced
    /// when one is dropped: an upper bound of what lives).
    pub counted: u64,
    /// Bytes of the allocator's memory blocks now (dedicated allocations, sub-allocated blocks
    /// with their unused room, wgpu's staging buffers); None where the backend has no report
    /// (OpenGL, Metal).
    pub reserved: Option<u64>,
    /// The most `reserved` has been when sampled.
    pub reserved_peak: Option<u64>,
}

impl GpuMemory {
    /// The figure a VRAM budget is checked against: the larger of ember's count and the
    /// allocator's blocks at their peak.
    pub fn peak(&self) -> u64 {
        self.counted.max(self.reserved_peak.unwrap_or(0))
    }
}

impl std::fmt::Display for GpuMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(f, "{:.1} MiB allocated at the peak (ember's buffers {:.1} MiB", mib(self.peak()), mib(self.counted))?;
        match (self.reserved, self.reserved_peak) {
            (Some(now), Some(peak)) => write!(f, "; the allocator's blocks {:.1} MiB now, {:.1} MiB at the peak)", mib(now), mib(peak)),
            _ => write!(f, "; this backend reports no allocator blocks)"),
        }
    }
}

impl GpuContext {
    /// Opens the chosen adapter, asking for SHADER_F16, SUBGROUP and TIMESTAMP_QUERY where
    /// present and for the adapter's own limits (not WebGPU's small defaults).
    pub fn new(choice: &DeviceChoice) -> Result<GpuContext, GpuError> {
        Self::open(choice)
    }

    /// The context with other kernel choices than the measured defaults. Set them before
    /// uploading weights: `integer_decode` decides the layout of Q4 matrices. A cooperative-matrix
    /// tile over the adapter's workgroup memory is refused, where the adapter has them.
    pub fn with_tuning(mut self, tuning: super::GpuTuning) -> Result<Self, GpuError> {
        if self.features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) && tuning.coop_matrix {
            tuning.coop_shape.check(self.limits.max_compute_workgroup_storage_size).map_err(|e| GpuError::Unsupported(format!("{e}: choose a smaller tile")))?;
        }
        self.tuning = tuning;
        Ok(self)
    }

    fn open(choice: &DeviceChoice) -> Result<GpuContext, GpuError> {
        let adapters = enumerate();
        if adapters.is_empty() {
            return Err(GpuError::NoAdapter);
        }
        let summaries: Vec<AdapterSummary> = adapters.iter().enumerate().map(|(i, a)| summarize(i, a)).collect();
        let pick = match choice {
            DeviceChoice::Index(i) => summaries.get(*i).map(|s| s.index).ok_or_else(|| GpuError::NoSuchDevice(format!("index {i}"), summaries.len()))?,
            DeviceChoice::Name(n) => summaries
                .iter()
                .find(|s| s.name.to_lowercase().contains(&n.to_lowercase()))
                .map(|s| s.index)
                .ok_or_else(|| GpuError::NoSuchDevice(format!("name {n:?}"), summaries.len()))?,
            DeviceChoice::Best | DeviceChoice::BestOrSoftware => {
                let best = summaries.iter().min_by_key(|s| s.rank()).unwrap();
                if matches!(choice, DeviceChoice::Best) && (best.is_software() || best.is_gl()) {
                    return Err(GpuError::OnlySoftware(best.name.clone()));
                }
                best.index
            }
        };
        let adapter = &adapters[pick];
        let summary = summaries[pick].clone();
        if summary.is_gl() {
            eprintln!("ember: warning: {} is an OpenGL adapter: no f16, no subgroups, slow. Install a Vulkan driver (on Linux: mesa-vulkan-drivers, libvulkan1).", summary.name);
        } else if summary.is_software() {
            eprintln!("ember: warning: {} is a software rasteriser: correct but slow; use it for tests.", summary.name);
        }
        let mut wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let limits = adapter.limits();
        let coop = coop_matrix_usable(adapter, &limits);
        if coop {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = adapter.features() & wanted;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ember"),
            required_features: features,
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Manual { suballocated_device_memory_block_size: DEVICE_BLOCK },
            // SAFETY: the one experimental feature ember asks for is the cooperative matrix,
            // used by one kernel (shaders/matmul_coop.wgsl) in the shapes the adapter lists,
            // with the portable kernel as the tested reference beside it.
            experimental_features: if coop { unsafe { wgpu::ExperimentalFeatures::enabled() } } else { wgpu::ExperimentalFeatures::disabled() },
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(summary.name.clone(), e.to_string()))?;
        // A validation error or a lost device is a bug or a broken driver: say so and stop,
        // rather than panic with a backtrace or go on computing garbage.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            eprintln!("error: GPU: {e}");
            std::process::exit(1);
        }));
        let base_reserved = device.generate_allocator_report().map_or(0, |r| r.total_reserved_bytes);
        Ok(GpuContext { tuning: Default::default(),
            base_reserved,
            adapter: summary,
            device,
            queue,
            features,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            allocated: Default::default(),
            staging: Mutex::new(Staging::default()),
            reserved_peak: AtomicU64::new(base_reserved),
        })
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether the tiled prefill products run on cooperative matrices (tensor cores): the
    /// adapter offers 16x16x16 f16 fragments accumulating in f32 with subgroups of 32, and the
    /// tuning does not turn them off ([`GpuTuning::coop_matrix`](super::GpuTuning)).
    pub fn has_coop_matrix(&self) -> bool {
        self.features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) && self.tuning.coop_matrix
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Timestamps between the dispatches of one pass (a token profiled as it really runs).
    pub fn has_timestamps_in_passes(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    }

    /// The largest storage buffer one binding may cover; bigger tensors are split.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }

    /// The compute pipeline of `spec`, compiled once and cached under [`ShaderSpec::key`]
    /// (which changes whenever the text or the entry point does).
    pub fn pipeline(&self, spec: &ShaderSpec) -> Arc<wgpu::ComputePipeline> {
        let key = spec.key();
        let mut cache = self.pipelines.lock().unwrap();
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let source = spec.text();
        let desc = wgpu::ShaderModuleDescriptor { label: Some(&key), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // naga's loop bounding adds a hidden counter to every loop, which stops NVIDIA's compiler
        // from unrolling the kernels' small constant loops (their register arrays then spill:
        // Q4_0 decode 26.9 -> 18.2 µs on an H100 without it). Every loop in shaders/ has a
        // bound computed from uniforms; bounds checks on memory accesses stay on.
        let checks = wgpu::ShaderRuntimeChecks { force_loop_bounding: false, ..wgpu::ShaderRuntimeChecks::checked() };
        // SAFETY: the shaders are ember's own (validated by naga in tests), with bounded loops.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(spec.entry()),
            compilation_options: Default::default(),
            cache: None,
        }));
        cache.insert(key, p.clone());
        p
    }

    /// Bytes of GPU buffers created so far through this context (transient readback staging
    /// buffers excluded: they live only during a read, in host memory).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn count(&self, size: u64) {
        self.allocated.fetch_add(size, Ordering::Relaxed);
    }

    /// Bytes the allocator under wgpu holds now, all memory blocks included; records the peak.
    fn sample_reserved(&self) -> Option<u64> {
        let rep = self.device.generate_allocator_report()?;
        let r = rep.total_reserved_bytes;
        self.reserved_peak.fetch_max(r, Ordering::Relaxed);
        Some(r)
    }

    /// What this context holds on the GPU now and at its peak. Samples the allocator.
    pub fn memory(&self) -> GpuMemory {
        let reserved = self.sample_reserved();
        GpuMemory {
            counted: self.allocated_bytes(),
            reserved,
            reserved_peak: reserved.map(|_| self.reserved_peak.load(Ordering::Relaxed)),
        }
    }

    /// Bytes a VRAM budget must keep free beyond ember's buffers: wgpu's own buffers (what
    /// the allocator held when the device was opened), the upload staging buffer
    /// ([`STAGING_CAP`]) and the unused room of the allocator's partly filled blocks (one
    /// device-local block, one host-visible block for small per-token writes, one for
    /// readbacks). An estimate, not the measurement: [`GpuContext::memory`] measures.
    pub fn headroom_bytes(&self) -> u64 {
        self.base_reserved + PLANNING_MARGIN
    }

    /// Room for the staging buffer (where no upload has made it yet) and the tail of the
    /// device block being filled: what a budget keeps free, beyond
    /// [`GpuContext::allocator_excess`], while more buffers are uploaded.
    pub fn upload_margin(&self) -> u64 {
        let staging = if self.staging.lock().unwrap().buffer.is_some() { 0 } else { STAGING_CAP };
        staging + DEVICE_BLOCK.end
    }

    /// Once the uploads so far are done: the allocator's bytes beyond ember's buffers (wgpu's
    /// own buffers, unused room in blocks), and the part of it not wgpu's own as a share of
    /// ember's bytes (how much sub-allocation has wasted on these buffers: on lavapipe, whose
    /// staging and buffers share blocks, about a fifth). None without an allocator report.
    pub fn allocator_excess(&self) -> Option<(u64, f64)> {
        self.flush_uploads();
        let reserved = self.sample_reserved()?;
        let counted = self.allocated_bytes();
        let excess = reserved.saturating_sub(counted);
        Some((excess, excess.saturating_sub(self.base_reserved) as f64 / counted.max(1) as f64))
    }

    /// Writes `data` into `buf` at `offset` through one reused staging buffer of
    /// [`STAGING_CAP`] bytes: copy a chunk into it, have the GPU copy it out, wait, repeat
    /// (one wait per chunk and per call: ~1000 for a 7B model, a fraction of a second).
    /// `queue.write_buffer` would allocate a staging buffer per call that lives until the GPU
    /// has run the submission that copies it: a model uploaded in one go held a second copy of
    /// itself (in VRAM, where host-visible memory is device-local, as NVIDIA's with resizable
    /// BAR) until the first forward pass; and staging freed between buffers leaves holes in
    /// the allocator's blocks where memory is unified (lavapipe). `data.len()` and `offset` are
    /// multiples of 4.
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        let mut st = self.staging.lock().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            if st.buffer.is_none() {
                self.count(STAGING_CAP);
                st.buffer = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("upload staging"),
                    size: STAGING_CAP,
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                }));
                (st.mapped, st.fill) = (true, 0);
            }
            let staging = st.buffer.clone().expect("created above");
            if !st.mapped {
                // Waits for the copies out of it to finish. A lost device shows up at the next
                // read (as GpuError::Lost) or through the uncaptured-error handler; the upload
                // is moot then.
                if self.map_wait(&staging, wgpu::MapMode::Write, None).is_err() {
                    return;
                }
                (st.mapped, st.fill) = (true, 0);
            }
            // Mapped ranges start at multiples of 8.
            let at = st.fill.next_multiple_of(8);
            let len = (data.len() - done).min(STAGING_CAP.saturating_sub(at) as usize);
            if len == 0 {
                self.submit_staged(&mut st);
                continue;
            }
            match staging.slice(at..at + len as u64).get_mapped_range_mut() {
                Ok(mut view) => view.copy_from_slice(&data[done..done + len]),
                Err(_) => return,
            }
            let enc = st.encoder.get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("upload") }));
            enc.copy_buffer_to_buffer(&staging, at, buf, offset + done as u64, len as u64);
            st.fill = at + len as u64;
            done += len;
            if st.fill >= STAGING_CAP {
                self.submit_staged(&mut st);
            }
        }
        // Submitted now, so that every later submission (a forward pass, a test's dispatch)
        // sees the data, as it would after `queue.write_buffer`; the next write waits for it.
        self.submit_staged(&mut st);
    }

    /// Unmaps the staging buffer and submits the copies out of it recorded so far.
    fn submit_staged(&self, st: &mut Staging) {
        if let (Some(b), true) = (&st.buffer, st.mapped) {
            b.unmap();
            st.mapped = false;
        }
        if let Some(enc) = st.encoder.take() {
            self.queue.submit([enc.finish()]);
        }
    }

    /// Waits for the uploads written so far and samples the allocator.
    pub fn flush_uploads(&self) {
        let st = self.staging.lock().unwrap();
        if st.buffer.is_some() && !st.mapped {
            let _ = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        }
        drop(st);
        self.sample_reserved();
    }

    fn buffer_with(&self, label: &str, data: &[u8], size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.count(size);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: usage | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        // Queue writes need a multiple of 4 bytes.
        let whole = data.len() / 4 * 4;
        self.write(&buf, 0, &data[..whole]);
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.write(&buf, whole as u64, &tail);
        }
        buf
    }

    /// A storage buffer holding `data` (padded to 4 bytes).
    pub fn upload(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let size = (data.len().max(4) as u64).div_ceil(4) * 4;
        self.buffer_with(label, data, size, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC)
    }

    /// A zeroed storage buffer of `size` bytes.
    pub fn zeros(&self, label: &str, size: u64) -> wgpu::Buffer {
        let size = size.max(4).div_ceil(4) * 4;
        self.count(size);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A zeroed buffer a kernel writes and an indirect dispatch reads its arguments from.
    pub fn indirect_args(&self, label: &str, size: u64) -> wgpu::Buffer {
        let size = size.max(4).div_ceil(4) * 4;
        self.count(size);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A buffer the host maps to read what the GPU copied into it (kept, unlike `read`'s).
    pub fn readback_buffer(&self, label: &str, size: u64) -> wgpu::Buffer {
        let size = size.max(4).div_ceil(4) * 4;
        self.count(size);
        self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false })
    }

    /// A buffer the host fills to have the GPU copy it elsewhere (kept, counted; mapped for
    /// writing at creation): a streaming area's staging, as opposed to the one reused upload
    /// staging buffer behind [`GpuContext::write`].
    pub fn upload_buffer(&self, label: &str, size: u64) -> wgpu::Buffer {
        let size = size.max(4).div_ceil(4) * 4;
        self.count(size);
        self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC, mapped_at_creation: true })
    }

    /// A uniform buffer holding `data`.
    pub fn uniform(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let size = (data.len().max(16) as u64).div_ceil(16) * 16;
        self.buffer_with(label, data, size, wgpu::BufferUsages::UNIFORM)
    }

    /// Copies `len` bytes from the start of `buf` back to the host, waiting for the GPU.
    pub fn read_bytes(&self, buf: &wgpu::Buffer, len: u64) -> Result<Vec<u8>, GpuError> {
        let size = len.max(4).div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        self.read_mapped(&staging, len, None)
    }

    /// Waits for submission `until` (for all work when None), then maps `staging` (a
    /// MAP_READ buffer), copies out its first `len` bytes and unmaps it.
    pub fn read_mapped(&self, staging: &wgpu::Buffer, len: u64, until: Option<wgpu::SubmissionIndex>) -> Result<Vec<u8>, GpuError> {
        self.map_wait(staging, wgpu::MapMode::Read, until)?;
        let out = staging.slice(..).get_mapped_range().map_err(|e| GpuError::Lost(e.to_string()))?[..len as usize].to_vec();
        staging.unmap();
        Ok(out)
    }

    /// Maps all of `buf` for `mode` and blocks until it is mapped (after submission `until`,
    /// or every submission so far).
    fn map_wait(&self, buf: &wgpu::Buffer, mode: wgpu::MapMode, until: Option<wgpu::SubmissionIndex>) -> Result<(), GpuError> {
        let lost = |e: String| GpuError::Lost(e);
        let (tx, rx) = std::sync::mpsc::channel();
        buf.slice(..).map_async(mode, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::Wait { submission_index: until, timeout: None }).map_err(|e| lost(e.to_string()))?;
        rx.recv().map_err(|e| lost(e.to_string()))?.map_err(|e| lost(e.to_string()))
    }

    /// Reads `n` values of type T from the start of `buf`.
    pub fn read<T: bytemuck::Pod>(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<T>, GpuError> {
        let bytes = self.read_bytes(buf, (n * std::mem::size_of::<T>()) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Encodes one compute dispatch of `pipeline` over `workgroups`, binding `buffers` to
    /// group 0 in order.
    pub fn dispatch(&self, enc: &mut wgpu::CommandEncoder, pipeline: &wgpu::ComputePipeline, buffers: &[wgpu::BindingResource], workgroups: (u32, u32, u32)) {
        let entries: Vec<wgpu::BindGroupEntry> = buffers.iter().enumerate().map(|(i, r)| wgpu::BindGroupEntry { binding: i as u32, resource: r.clone() }).collect();
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &entries });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(workgroups.0, workgroups.1, workgroups.2);
    }

    /// Submits the encoder and waits for the GPU to finish it.
    pub fn submit_and_wait(&self, enc: wgpu::CommandEncoder) -> Result<(), GpuError> {
        self.queue.submit([enc.finish()]);
        self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| GpuError::Lost(e.to_string()))?;
        Ok(())
    }
}
