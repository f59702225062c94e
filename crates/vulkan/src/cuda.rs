//! The CUDA baselines of the benchmarks on NVIDIA hosts: the same streaming kernel over CUDA
//! managed memory, and the host-to-device copy bandwidth (the physical limit for data that
//! lives in host memory).
//!
//! The CUDA driver library (`libcuda.so.1`, present wherever the NVIDIA driver is) is opened at
//! run time, so nothing is needed to build. Managed memory comes from `cuMemAllocManaged`, which
//! is what the runtime's `cudaMallocManaged` calls. The kernel is PTX in this file (saxpy), which
//! the driver compiles for the GPU at load time, so no CUDA toolkit is needed either.
//!
//! This path was written without an NVIDIA host at hand and has not run yet; every failure is a
//! [`CudaError`] naming the call, so a bench on a host where it does not work reports why and goes
//! on.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::time::{Duration, Instant};

/// A CUDA driver call failed, or the library is missing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda.so.1` could not be opened (no NVIDIA driver) or lacks a function.
    #[error("CUDA driver unavailable: {what}")]
    Unavailable {
        /// What is missing.
        what: String,
    },
    /// A driver call returned an error code.
    #[error("{call} failed with CUDA error {code}")]
    Call {
        /// The function.
        call: &'static str,
        /// Its `CUresult`.
        code: c_int,
    },
}

type CuResult = c_int;
type Fn0 = unsafe extern "C" fn(c_uint) -> CuResult;
type FnDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type FnDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult;
type FnCtxRetain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult;
type FnCtxSet = unsafe extern "C" fn(*mut c_void) -> CuResult;
type FnCtxRelease = unsafe extern "C" fn(c_int) -> CuResult;
type FnModuleLoad = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult;
type FnModuleUnload = unsafe extern "C" fn(*mut c_void) -> CuResult;
type FnGetFunction = unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult;
type FnAllocManaged = unsafe extern "C" fn(*mut u64, usize, c_uint) -> CuResult;
type FnAlloc = unsafe extern "C" fn(*mut u64, usize) -> CuResult;
type FnFree = unsafe extern "C" fn(u64) -> CuResult;
type FnAllocHost = unsafe extern "C" fn(*mut *mut c_void, usize) -> CuResult;
type FnFreeHost = unsafe extern "C" fn(*mut c_void) -> CuResult;
type FnHtoD = unsafe extern "C" fn(u64, *const c_void, usize) -> CuResult;
type FnSync = unsafe extern "C" fn() -> CuResult;
#[allow(clippy::type_complexity)]
type FnLaunch = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;

/// `y[i] = a * x[i] + y[i]`, one thread per element: the CUDA twin of `shaders/stream.comp`.
const SAXPY_PTX: &CStr = c"
.version 6.0
.target sm_50
.address_size 64

.visible .entry saxpy(
    .param .u64 px,
    .param .u64 py,
    .param .f32 pa,
    .param .u32 pn
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<5>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [px];
    ld.param.u64 %rd2, [py];
    ld.param.f32 %f1, [pa];
    ld.param.u32 %r1, [pn];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd3, %rd5;
    add.s64 %rd7, %rd4, %rd5;
    ld.global.f32 %f2, [%rd6];
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f4, %f1, %f2, %f3;
    st.global.f32 [%rd7], %f4;
DONE:
    ret;
}
";

/// The driver functions used.
struct Api {
    device_get_name: FnDeviceGetName,
    ctx_release: FnCtxRelease,
    module_unload: FnModuleUnload,
    alloc_managed: FnAllocManaged,
    alloc: FnAlloc,
    free: FnFree,
    alloc_host: FnAllocHost,
    free_host: FnFreeHost,
    htod: FnHtoD,
    sync: FnSync,
    launch: FnLaunch,
}

/// The `dlopen` handle, closed on drop (after everything made through it).
struct Lib(*mut c_void);

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: nothing from the library is used after its owner is gone.
        unsafe { libc::dlclose(self.0) };
    }
}

/// An open CUDA device with the saxpy kernel loaded.
pub struct CudaBaseline {
    api: Api,
    device: c_int,
    module: *mut c_void,
    saxpy: *mut c_void,
    /// Last: dropped after `Drop::drop` released the context.
    _lib: Lib,
}

impl std::fmt::Debug for CudaBaseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBaseline")
            .field("device", &self.device_name())
            .finish()
    }
}

fn check(call: &'static str, code: CuResult) -> Result<(), CudaError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CudaError::Call { call, code })
    }
}

/// Looks `name` up in `lib` as a function of type `T`.
///
/// # Safety
///
/// `lib` is a live `dlopen` handle and `T` is the C signature of `name`.
unsafe fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Result<T, CudaError> {
    // SAFETY: `lib` is live (the caller's contract); `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(CudaError::Unavailable {
            what: format!("libcuda.so.1 has no {}", name.to_string_lossy()),
        });
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: `T` is a function pointer type of the symbol's signature (the caller's contract),
    // the same size as the symbol address.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl CudaBaseline {
    /// Opens the first CUDA device and loads the kernel.
    pub fn open() -> Result<Self, CudaError> {
        // SAFETY: dlopen of the system's driver library runs its initialisers; trusted.
        let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            return Err(CudaError::Unavailable {
                what: "libcuda.so.1 not found (no NVIDIA driver)".into(),
            });
        }
        Self::init(Lib(lib))
    }

    fn init(owned: Lib) -> Result<Self, CudaError> {
        let lib = owned.0;
        // Every `sym` below: `lib` is live; the types are the driver API's signatures.
        // SAFETY: as said.
        let init: Fn0 = unsafe { sym(lib, c"cuInit") }?;
        // SAFETY: as above.
        let device_get: FnDeviceGet = unsafe { sym(lib, c"cuDeviceGet") }?;
        // SAFETY: as above.
        let retain: FnCtxRetain = unsafe { sym(lib, c"cuDevicePrimaryCtxRetain") }?;
        // SAFETY: as above.
        let set_current: FnCtxSet = unsafe { sym(lib, c"cuCtxSetCurrent") }?;
        // SAFETY: as above.
        let load: FnModuleLoad = unsafe { sym(lib, c"cuModuleLoadData") }?;
        // SAFETY: as above.
        let get_function: FnGetFunction = unsafe { sym(lib, c"cuModuleGetFunction") }?;
        let api = Api {
            // SAFETY: as above.
            device_get_name: unsafe { sym(lib, c"cuDeviceGetName") }?,
            // SAFETY: as above.
            ctx_release: unsafe { sym(lib, c"cuDevicePrimaryCtxRelease_v2") }?,
            // SAFETY: as above.
            module_unload: unsafe { sym(lib, c"cuModuleUnload") }?,
            // SAFETY: as above.
            alloc_managed: unsafe { sym(lib, c"cuMemAllocManaged") }?,
            // SAFETY: as above.
            alloc: unsafe { sym(lib, c"cuMemAlloc_v2") }?,
            // SAFETY: as above.
            free: unsafe { sym(lib, c"cuMemFree_v2") }?,
            // SAFETY: as above.
            alloc_host: unsafe { sym(lib, c"cuMemAllocHost_v2") }?,
            // SAFETY: as above.
            free_host: unsafe { sym(lib, c"cuMemFreeHost") }?,
            // SAFETY: as above.
            htod: unsafe { sym(lib, c"cuMemcpyHtoD_v2") }?,
            // SAFETY: as above.
            sync: unsafe { sym(lib, c"cuCtxSynchronize") }?,
            // SAFETY: as above.
            launch: unsafe { sym(lib, c"cuLaunchKernel") }?,
        };
        // SAFETY: a plain driver call.
        check("cuInit", unsafe { init(0) })?;
        let mut device = 0;
        // SAFETY: `device` is a valid out pointer.
        check("cuDeviceGet", unsafe { device_get(&mut device, 0) })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out pointer; `device` was just obtained.
        check("cuDevicePrimaryCtxRetain", unsafe {
            retain(&mut ctx, device)
        })?;
        let mut me = CudaBaseline {
            _lib: owned,
            api,
            device,
            module: std::ptr::null_mut(),
            saxpy: std::ptr::null_mut(),
        };
        // SAFETY: `ctx` is the retained primary context.
        check("cuCtxSetCurrent", unsafe { set_current(ctx) })?;
        let mut module = std::ptr::null_mut();
        // SAFETY: the PTX is a NUL-terminated image; `module` a valid out pointer.
        check("cuModuleLoadData", unsafe {
            load(&mut module, SAXPY_PTX.as_ptr().cast())
        })?;
        me.module = module;
        let mut f = std::ptr::null_mut();
        // SAFETY: `module` is loaded; the name is NUL-terminated.
        check("cuModuleGetFunction", unsafe {
            get_function(&mut f, module, c"saxpy".as_ptr())
        })?;
        me.saxpy = f;
        Ok(me)
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        let mut buf = [0 as c_char; 256];
        // SAFETY: `buf` holds 256 bytes; the driver writes a NUL-terminated name into it.
        let rc = unsafe { (self.api.device_get_name)(buf.as_mut_ptr(), 256, self.device) };
        if rc != 0 {
            return format!("CUDA device {}", self.device);
        }
        // SAFETY: NUL-terminated by the driver (and by the zeroed buffer's end).
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn launch(&self, x: u64, y: u64, a: f32, n: u32) -> Result<(), CudaError> {
        let (mut px, mut py, mut pa, mut pn) = (x, y, a, n);
        let mut params: [*mut c_void; 4] = [
            (&mut px as *mut u64).cast(),
            (&mut py as *mut u64).cast(),
            (&mut pa as *mut f32).cast(),
            (&mut pn as *mut u32).cast(),
        ];
        let blocks = n.div_ceil(256);
        // SAFETY: `saxpy` takes (u64, u64, f32, u32), matching `params`, which outlive the
        // call; the grid covers `n` threads.
        let rc = unsafe {
            (self.api.launch)(
                self.saxpy,
                blocks,
                1,
                1,
                256,
                1,
                1,
                0,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", rc)?;
        // SAFETY: a plain driver call on the current context.
        check("cuCtxSynchronize", unsafe { (self.api.sync)() })
    }

    /// Runs saxpy over `n` floats of managed memory `runs` times, each after the CPU wrote `y`
    /// (so the pages start on the host, as SVM's do); returns the time of each launch and
    /// synchronisation, and whether the result was right.
    pub fn managed_stream(&self, n: u32, runs: u32) -> Result<(Vec<Duration>, bool), CudaError> {
        let bytes = n as usize * 4;
        let mut x = 0u64;
        let mut y = 0u64;
        // SAFETY: valid out pointer; CU_MEM_ATTACH_GLOBAL = 1.
        check("cuMemAllocManaged", unsafe {
            (self.api.alloc_managed)(&mut x, bytes, 1)
        })?;
        // SAFETY: as above.
        let rc = unsafe { (self.api.alloc_managed)(&mut y, bytes, 1) };
        if rc != 0 {
            // SAFETY: `x` was allocated above and is unused.
            unsafe { (self.api.free)(x) };
            return check("cuMemAllocManaged", rc).map(|_| (Vec::new(), false));
        }
        let (xp, yp) = (x as usize as *mut f32, y as usize as *mut f32);
        for i in 0..n as usize {
            // SAFETY: managed memory is host-accessible while no kernel runs; in bounds.
            unsafe { xp.wrapping_add(i).write(i as f32) };
        }
        let mut times = Vec::with_capacity(runs as usize);
        let mut right = true;
        let mut result = Ok(());
        for _ in 0..runs {
            for i in 0..n as usize {
                // SAFETY: as above.
                unsafe { yp.wrapping_add(i).write(1.0) };
            }
            let t = Instant::now();
            result = self.launch(x, y, 2.0, n);
            times.push(t.elapsed());
            if result.is_err() {
                break;
            }
            // SAFETY: the kernel finished (synchronised); in bounds.
            let v = unsafe { yp.wrapping_add(n as usize - 1).read() };
            right &= v == 2.0 * (n - 1) as f32 + 1.0;
        }
        // SAFETY: allocated above; no kernel runs.
        unsafe { (self.api.free)(x) };
        // SAFETY: as above.
        unsafe { (self.api.free)(y) };
        result.map(|_| (times, right))
    }

    /// Copies `bytes` from pinned host memory to device memory `runs` times; returns the time
    /// of each copy.
    pub fn htod_copy(&self, bytes: usize, runs: u32) -> Result<Vec<Duration>, CudaError> {
        let mut host = std::ptr::null_mut();
        // SAFETY: valid out pointer.
        check("cuMemAllocHost", unsafe {
            (self.api.alloc_host)(&mut host, bytes)
        })?;
        let mut dev = 0u64;
        // SAFETY: valid out pointer.
        let rc = unsafe { (self.api.alloc)(&mut dev, bytes) };
        if rc != 0 {
            // SAFETY: allocated above, unused.
            unsafe { (self.api.free_host)(host) };
            return check("cuMemAlloc", rc).map(|_| Vec::new());
        }
        // SAFETY: `host` holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(host.cast::<u8>(), 1, bytes) };
        let mut times = Vec::with_capacity(runs as usize);
        let mut result = Ok(());
        for _ in 0..runs {
            let t = Instant::now();
            // SAFETY: both allocations hold `bytes` bytes.
            let rc = unsafe { (self.api.htod)(dev, host, bytes) };
            times.push(t.elapsed());
            result = check("cuMemcpyHtoD", rc);
            if result.is_err() {
                break;
            }
        }
        // SAFETY: allocated above; the synchronous copies are done.
        unsafe { (self.api.free)(dev) };
        // SAFETY: as above.
        unsafe { (self.api.free_host)(host) };
        result.map(|_| times)
    }
}

impl Drop for CudaBaseline {
    fn drop(&mut self) {
        if !self.module.is_null() {
            // SAFETY: loaded in `init`; no launch is running (every launch synchronises).
            unsafe { (self.api.module_unload)(self.module) };
        }
        // SAFETY: the primary context was retained in `init`.
        unsafe { (self.api.ctx_release)(self.device) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_nvidia_driver_open_says_so() {
        // On a host with the driver this opens the device; elsewhere it must be a clear error,
        // never a crash.
        match CudaBaseline::open() {
            Ok(c) => assert!(!c.device_name().is_empty()),
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}
