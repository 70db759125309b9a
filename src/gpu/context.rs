//! One GPU context per process: the adapter, device and queue, the features and limits ember
//! asked for, and a cache of compiled pipelines.

use super::GpuError;
use std::collections::HashMap;
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
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Bytes of every buffer created through this context (weights, caches, scratch, uniforms),
    /// so that a VRAM budget can be checked against what was really allocated.
    allocated: std::sync::atomic::AtomicU64,
}

impl GpuContext {
    /// Opens the chosen adapter, asking for SHADER_F16, SUBGROUP and TIMESTAMP_QUERY where
    /// present and for the adapter's own limits (not WebGPU's small defaults).
    pub fn new(choice: &DeviceChoice) -> Result<GpuContext, GpuError> {
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
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ember"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(summary.name.clone(), e.to_string()))?;
        // A validation error or a lost device is a bug or a broken driver: say so and stop,
        // rather than panic with a backtrace or go on computing garbage.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            eprintln!("error: GPU: {e}");
            std::process::exit(1);
        }));
        Ok(GpuContext { adapter: summary, device, queue, features, limits, pipelines: Mutex::new(HashMap::new()), allocated: Default::default() })
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
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

    /// A compute pipeline for `entry` of `source`, compiled once and cached under `key`
    /// (the key must change whenever the source or its specialisation does).
    pub fn pipeline(&self, key: &str, source: &str, entry: &str) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap();
        if let Some(p) = cache.get(key) {
            return p.clone();
        }
        let desc = wgpu::ShaderModuleDescriptor { label: Some(key), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // naga's loop bounding adds a hidden counter to every loop, which stops NVIDIA's compiler
        // from unrolling the kernels' small constant loops (their register arrays then spill:
        // Q4_0 decode 26.9 -> 18.2 µs on an H100 without it). Every loop in shaders/ has a
        // bound computed from uniforms; bounds checks on memory accesses stay on.
        let checks = wgpu::ShaderRuntimeChecks { force_loop_bounding: false, ..wgpu::ShaderRuntimeChecks::checked() };
        // SAFETY: the shaders are ember's own (validated by naga in tests), with bounded loops.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        }));
        cache.insert(key.to_string(), p.clone());
        p
    }

    /// Bytes of GPU buffers created so far through this context (transient readback staging
    /// buffers excluded: they live only during a read).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, size: u64) {
        self.allocated.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
    }

    fn buffer_with(&self, label: &str, data: &[u8], size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.count(size);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: usage | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        // Queue writes need a multiple of 4 bytes; they land before the next submission.
        let whole = data.len() / 4 * 4;
        self.queue.write_buffer(&buf, 0, &data[..whole]);
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.queue.write_buffer(&buf, whole as u64, &tail);
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
        let lost = |e: String| GpuError::Lost(e);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::Wait { submission_index: until, timeout: None }).map_err(|e| lost(e.to_string()))?;
        rx.recv().map_err(|e| lost(e.to_string()))?.map_err(|e| lost(e.to_string()))?;
        let out = slice.get_mapped_range().map_err(|e| lost(e.to_string()))?[..len as usize].to_vec();
        staging.unmap();
        Ok(out)
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
