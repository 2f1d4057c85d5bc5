//! Adapter and device acquisition, kept apart from the work so tests (and the browser
//! glue) can inject their own adapter or device.

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::gpu_error;

/// A device, its queue and what the adapter really offers.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: wgpu::AdapterInfo,
    /// The limits the device was created with: the adapter's own, not WebGPU's
    /// defaults, because the 128 MiB default binding limit is too small for LM heads
    /// on some adapters and too large on others.
    pub limits: wgpu::Limits,
    lost: Arc<Mutex<Option<String>>>,
}

/// Backends to probe: Vulkan natively (lavapipe on CI; also avoids a GL probe
/// warning), the browser's WebGPU on wasm32.
fn backends() -> wgpu::Backends {
    if cfg!(target_arch = "wasm32") {
        wgpu::Backends::BROWSER_WEBGPU
    } else {
        wgpu::Backends::VULKAN
    }
}

/// Finds a high-performance adapter, or says how to get one.
pub async fn request_adapter() -> Result<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends();
    let instance = wgpu::Instance::new(desc);
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    };
    instance.request_adapter(&options).await.map_err(|e| {
        gpu_error(format!(
            "no WebGPU/Vulkan adapter found ({e}); natively install a Vulkan driver \
             (without a GPU: `apt-get install mesa-vulkan-drivers libvulkan1` for lavapipe), \
             in a browser enable WebGPU"
        ))
    })
}

impl GpuContext {
    /// Probes the default adapter and opens a device on it.
    pub async fn new() -> Result<Self> {
        let adapter = request_adapter().await?;
        Self::from_adapter(&adapter).await
    }

    /// Blocking [`GpuContext::new`] for native code and tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// Opens a device on `adapter` with the adapter's real limits and no optional
    /// features: `shader-f16` in particular is never required (f16 scales are read
    /// from u32 words with `unpack2x16float`).
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let adapter_info = adapter.get_info();
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("genarm"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = adapter.request_device(&desc).await.map_err(|e| {
            gpu_error(format!(
                "opening a device on adapter `{}` failed: {e}",
                adapter_info.name
            ))
        })?;
        Ok(Self::from_device(device, queue, adapter_info, limits))
    }

    /// Wraps a device opened elsewhere; `limits` must be the ones it was created with.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: wgpu::AdapterInfo,
        limits: wgpu::Limits,
    ) -> Self {
        // A lost device only says so through this callback; remember the reason so
        // the next call can return it instead of failing obscurely.
        let lost = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(format!("device lost ({reason:?}: {message})"));
            }
        });
        // Errors nobody scoped (out of memory above all) would otherwise panic in wgpu's
        // default handler; keep the first one for the next call to report.
        let slot = Arc::clone(&lost);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            if let Ok(mut slot) = slot.lock() {
                let what = match &error {
                    wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                    other => format!("GPU error: {other}"),
                };
                slot.get_or_insert(what);
            }
        }));
        Self {
            device,
            queue,
            adapter_info,
            limits,
            lost,
        }
    }

    /// The adapter's name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub fn adapter_name(&self) -> &str {
        &self.adapter_info.name
    }

    /// Errors if the device has been lost (driver reset, browser tab backgrounded...)
    /// or raised an error no scope caught (out of memory, a failed validation).
    pub fn check_lost(&self) -> Result<()> {
        match self.lost.lock().ok().and_then(|slot| slot.clone()) {
            Some(reason) => Err(gpu_error(reason)),
            None => Ok(()),
        }
    }

    /// The largest byte range one storage binding may cover.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Splits `n` workgroups into a 2-D grid within the per-dimension limit; shaders
    /// recover the linear id with `workgroup_index` (shaders/common.wgsl) and skip ids
    /// past `n`.
    pub fn grid(&self, n: u32) -> (u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            (n.max(1), 1)
        } else {
            (max, n.div_ceil(max))
        }
    }

    /// Copies `buffer` to the host as f32 (native only: it blocks on the device).
    /// Decode never uses this per token; it exists for tests and debugging.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, buffer: &wgpu::Buffer) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Copies `buffer` to the host (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_bytes(&self, buffer: &wgpu::Buffer) -> Result<Vec<u8>> {
        self.check_lost()?;
        let size = buffer.size();
        // Storage buffers cannot be mapped; go through a MAP_READ staging copy.
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| gpu_error(format!("waiting for the device: {e}")))?;
        rx.recv()
            .map_err(|_| gpu_error("readback callback never ran"))?
            .map_err(|e| gpu_error(format!("mapping a readback buffer: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| gpu_error(format!("mapped range: {e}")))?
            .to_vec();
        staging.unmap();
        self.check_lost()?;
        Ok(data)
    }
}
