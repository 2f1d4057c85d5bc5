//! Opening a CUDA device. The CUDA build links none of the CUDA libraries: cudarc loads
//! the driver, cuBLAS, cuRAND and NVRTC when the device is opened, and answers a missing
//! one with a panic. Here that becomes an error naming the library, so `--backend cuda`
//! on a machine without them fails like any other bad setting.

use candle_core::Device;

use crate::error::{Error, Result};

/// CUDA device `ordinal` (an error without `--features cuda` or the CUDA libraries).
pub fn open(ordinal: usize) -> Result<Device> {
    let hook = std::panic::take_hook();
    // Silent while trying: the panic's message goes into the error instead.
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    match opened {
        Ok(device) => Ok(device?),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the CUDA libraries could not be loaded");
            Err(Error::Gpu(format!(
                "cannot open CUDA device {ordinal}: {message}"
            )))
        }
    }
}
