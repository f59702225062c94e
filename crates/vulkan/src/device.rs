//! [`Gpu`]: the Vulkan instance, the chosen device, its queue, its allocator, and the Khronos
//! validation layer's error count.
//!
//! # Device selection
//!
//! Without an override, the first discrete GPU that has what svmirror needs wins, then an
//! integrated or virtual GPU, then a CPU device (lavapipe). `SVMIRROR_VK_DEVICE` (or
//! [`GpuConfig::device`]) picks one by index in enumeration order or by a case-insensitive part
//! of its name. The chosen device must offer:
//!
//! - `VK_EXT_external_memory_host` (imports of host pointers),
//! - Vulkan 1.2 with `bufferDeviceAddress` (shaders reach memory by 64-bit address),
//! - `shaderInt64` (the page table holds 64-bit entries).
//!
//! When it does not, the error lists exactly what is missing.
//!
//! # Validation
//!
//! With [`GpuConfig::validation`] (default: the `SVMIRROR_VK_VALIDATION` variable is set and not
//! `0`), the instance enables `VK_LAYER_KHRONOS_validation` and a debug-utils messenger that
//! counts every error-severity message; [`Gpu::validation_errors`] reads the count. A missing
//! layer is an error, never a silent downgrade.

use std::ffi::{CStr, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ash::vk;
use gpu_allocator::vulkan::{Allocator, AllocatorCreateDesc};

use crate::conv::vk_err;
use crate::error::{Result, VulkanError};

/// The environment variable that picks a device by index or name.
pub const DEVICE_ENV: &str = "SVMIRROR_VK_DEVICE";
/// The environment variable that turns the validation layer on.
pub const VALIDATION_ENV: &str = "SVMIRROR_VK_VALIDATION";
const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// How to open a [`Gpu`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// Index (in enumeration order) or part of the name of the device to use; `None`: the
    /// `SVMIRROR_VK_DEVICE` variable, else the best device.
    pub device: Option<String>,
    /// Enable the Khronos validation layer and count its errors.
    pub validation: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            device: None,
            validation: std::env::var(VALIDATION_ENV).is_ok_and(|v| !v.is_empty() && v != "0"),
        }
    }
}

impl GpuConfig {
    /// The default configuration with the validation layer on: what tests use.
    pub fn validated() -> Self {
        GpuConfig {
            validation: true,
            ..Self::default()
        }
    }
}

/// What was chosen, for logs and benchmark tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Discrete GPU, integrated GPU, CPU, ...
    pub kind: &'static str,
    /// The driver's name (e.g. "llvmpipe", "NVIDIA").
    pub driver: String,
    /// The driver's version string.
    pub driver_info: String,
    /// Vulkan version the device supports, "major.minor.patch".
    pub api_version: String,
    /// `minImportedHostPointerAlignment`.
    pub import_alignment: u64,
    /// `maxMemoryAllocationCount`.
    pub max_allocations: u32,
    /// `maxMemoryAllocationSize`.
    pub max_allocation_size: u64,
    /// Every device present, "index: name".
    pub all_devices: Vec<String>,
    /// The `sparseBinding` feature: whether buffers could be bound to memory piecewise (one
    /// buffer over many host-memory imports, instead of a page table in a shader). Mesa
    /// 22.3.6 lavapipe: false.
    pub sparse_binding: bool,
    /// The `sparseResidencyBuffer` feature: whether such a buffer may have unbound holes.
    /// Mesa 22.3.6 lavapipe: false.
    pub sparse_residency_buffer: bool,
}

/// A driver failure to inject, for tests of the error paths that lavapipe never takes on its
/// own. The next matching driver call fails as if the driver had returned the error; the
/// backend's real error mapping and clean-up run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFailure {
    /// The next host-memory import is refused (`VK_ERROR_INVALID_EXTERNAL_HANDLE`).
    ImportRefused,
    /// The next device memory allocation (import or gpu-allocator) is out of memory.
    OutOfDeviceMemory,
    /// The next submission or fence wait reports the device lost.
    DeviceLost,
}

/// Counts of validation messages, shared with the messenger callback.
#[derive(Debug, Default)]
struct ValidationLog {
    errors: AtomicU64,
    warnings: AtomicU64,
}

/// The validation layer's counts, readable after the [`Gpu`] is gone (the layer reports objects
/// leaked at device destruction only then).
#[derive(Clone, Debug)]
pub struct ValidationCounts(Arc<ValidationLog>);

impl ValidationCounts {
    /// Error-severity messages so far.
    pub fn errors(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }

    /// Warning-severity messages so far.
    pub fn warnings(&self) -> u64 {
        self.0.warnings.load(Ordering::Relaxed)
    }
}

unsafe extern "system" fn messenger_callback(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    // SAFETY: `user` is the `ValidationLog` that `Gpu` holds in an `Arc` from before creating
    // the messenger until after destroying it.
    let log = unsafe { &*(user as *const ValidationLog) };
    // SAFETY: the layer hands a valid callback-data struct for the duration of the call.
    let msg_ptr = unsafe { data.as_ref() }.map_or(std::ptr::null(), |d| d.p_message);
    let msg = if msg_ptr.is_null() {
        String::new()
    } else {
        // SAFETY: `p_message` is a NUL-terminated string valid during the call.
        unsafe { CStr::from_ptr(msg_ptr) }
            .to_string_lossy()
            .into_owned()
    };
    if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR) {
        log.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("svmirror-vulkan: validation error: {msg}");
    } else if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::WARNING) {
        log.warnings.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%msg, "validation warning");
    }
    vk::FALSE
}

/// The debug messenger and what it writes to.
struct Messenger {
    loader: ash::ext::debug_utils::Instance,
    handle: vk::DebugUtilsMessengerEXT,
    log: Arc<ValidationLog>,
}

/// The instance, device and allocator. See the [module documentation](self).
pub struct Gpu {
    // Field order is not drop order: `Drop` tears down allocator, pool, device, messenger,
    // instance explicitly.
    _entry: ash::Entry,
    pub(crate) instance: ash::Instance,
    messenger: Option<Messenger>,
    pub(crate) device: ash::Device,
    pub(crate) emh: ash::ext::external_memory_host::Device,
    queue: Mutex<vk::Queue>,
    pool: Mutex<vk::CommandPool>,
    allocator: Mutex<Option<Allocator>>,
    pub(crate) memory: vk::PhysicalDeviceMemoryProperties,
    pub(crate) info: DeviceInfo,
    /// Device memory objects this crate allocated directly (imports), not through the allocator.
    pub(crate) direct_allocations: AtomicU32,
    /// Allocations made through gpu-allocator and not yet freed.
    pub(crate) allocator_allocations: AtomicU32,
    inject: Mutex<Option<InjectedFailure>>,
    lost: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kind_name(t: vk::PhysicalDeviceType) -> &'static str {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => "discrete GPU",
        vk::PhysicalDeviceType::INTEGRATED_GPU => "integrated GPU",
        vk::PhysicalDeviceType::VIRTUAL_GPU => "virtual GPU",
        vk::PhysicalDeviceType::CPU => "CPU",
        _ => "other",
    }
}

/// Lower is better.
fn rank(t: vk::PhysicalDeviceType) -> u32 {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => 0,
        vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
        vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
        vk::PhysicalDeviceType::CPU => 3,
        _ => 4,
    }
}

fn version(v: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(v),
        vk::api_version_minor(v),
        vk::api_version_patch(v)
    )
}

fn c_chars(s: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = s
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One candidate device and what it lacks.
struct Candidate {
    index: usize,
    handle: vk::PhysicalDevice,
    name: String,
    kind: vk::PhysicalDeviceType,
    missing: Vec<&'static str>,
}

fn probe(instance: &ash::Instance, index: usize, pd: vk::PhysicalDevice) -> Candidate {
    // SAFETY: `pd` was enumerated from `instance`, which is alive.
    let props = unsafe { instance.get_physical_device_properties(pd) };
    let mut missing = Vec::new();
    // SAFETY: as above.
    let exts = unsafe { instance.enumerate_device_extension_properties(pd) }.unwrap_or_default();
    let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
    if !has(ash::ext::external_memory_host::NAME) {
        missing.push("VK_EXT_external_memory_host");
    }
    if props.api_version < vk::API_VERSION_1_2 {
        missing.push("Vulkan 1.2");
    } else {
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut v12);
        // SAFETY: `pd` belongs to `instance`, which supports Vulkan 1.2 queries (checked).
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        let int64 = f2.features.shader_int64 == vk::TRUE;
        if v12.buffer_device_address != vk::TRUE {
            missing.push("bufferDeviceAddress");
        }
        if !int64 {
            missing.push("shaderInt64");
        }
    }
    Candidate {
        index,
        handle: pd,
        name: props
            .device_name_as_c_str()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: props.device_type,
        missing,
    }
}

fn choose(cands: &[Candidate], wanted: Option<&str>) -> Result<usize> {
    let list = || {
        cands
            .iter()
            .map(|c| format!("{}: {}", c.index, c.name))
            .collect::<Vec<_>>()
    };
    if cands.is_empty() {
        return Err(VulkanError::NoDevice);
    }
    let pick = match wanted {
        Some(w) => {
            let w_lower = w.to_lowercase();
            let found = match w.parse::<usize>() {
                Ok(i) => cands.iter().position(|c| c.index == i),
                Err(_) => cands
                    .iter()
                    .position(|c| c.name.to_lowercase().contains(&w_lower)),
            };
            found.ok_or_else(|| VulkanError::NoMatchingDevice {
                wanted: w.to_string(),
                found: list(),
            })?
        }
        None => {
            let mut order: Vec<usize> = (0..cands.len()).collect();
            order.sort_by_key(|&i| (!cands[i].missing.is_empty(), rank(cands[i].kind), i));
            order[0]
        }
    };
    let c = &cands[pick];
    if !c.missing.is_empty() {
        return Err(VulkanError::MissingFeatures {
            device: c.name.clone(),
            missing: c.missing.clone(),
        });
    }
    Ok(pick)
}

impl Gpu {
    /// Loads the Vulkan loader, creates an instance, picks and opens a device. See the
    /// [module documentation](self) for the choice and the checks.
    pub fn new(config: &GpuConfig) -> Result<Self> {
        // SAFETY: loading libvulkan runs its initialisers; the system loader is trusted.
        let entry =
            unsafe { ash::Entry::load() }.map_err(|source| VulkanError::Loader { source })?;
        let mut layers: Vec<*const std::ffi::c_char> = Vec::new();
        let mut exts: Vec<*const std::ffi::c_char> = Vec::new();
        if config.validation {
            // SAFETY: a plain query on a loaded entry.
            let avail = unsafe { entry.enumerate_instance_layer_properties() }
                .map_err(vk_err("vkEnumerateInstanceLayerProperties"))?;
            if !avail
                .iter()
                .any(|l| l.layer_name_as_c_str() == Ok(VALIDATION_LAYER))
            {
                return Err(VulkanError::NoValidationLayer);
            }
            layers.push(VALIDATION_LAYER.as_ptr());
            exts.push(ash::ext::debug_utils::NAME.as_ptr());
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"svmirror")
            .api_version(vk::API_VERSION_1_2);
        let log = Arc::new(ValidationLog::default());
        let mut messenger_info = vk::DebugUtilsMessengerCreateInfoEXT::default()
            .message_severity(
                vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                    | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING,
            )
            .message_type(
                vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                    | vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                    | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
            )
            .pfn_user_callback(Some(messenger_callback))
            .user_data(Arc::as_ptr(&log) as *mut c_void);
        let mut ici = vk::InstanceCreateInfo::default()
            .application_info(&app)
            .enabled_layer_names(&layers)
            .enabled_extension_names(&exts);
        // Synchronization validation too: missing barriers between submissions are errors.
        let enables = [vk::ValidationFeatureEnableEXT::SYNCHRONIZATION_VALIDATION];
        let mut features =
            vk::ValidationFeaturesEXT::default().enabled_validation_features(&enables);
        if config.validation {
            // Also catches messages from instance creation and destruction.
            ici = ici.push_next(&mut messenger_info).push_next(&mut features);
        }
        // SAFETY: every pointer in `ici` refers to locals alive across the call.
        let instance =
            unsafe { entry.create_instance(&ici, None) }.map_err(vk_err("vkCreateInstance"))?;
        // `gpu_parts` destroys the instance (through its copy of the handle) if this function
        // returns early; at the end it lets go, and the `Gpu` owns `instance`.
        let mut gpu_parts = Partial {
            instance: Some(instance.clone()),
            messenger: None,
        };
        if config.validation {
            let loader = ash::ext::debug_utils::Instance::new(&entry, &instance);
            // SAFETY: the create info points at `log`, which the `Messenger` keeps alive for as
            // long as the messenger lives.
            let handle = unsafe { loader.create_debug_utils_messenger(&messenger_info, None) }
                .map_err(vk_err("vkCreateDebugUtilsMessengerEXT"))?;
            gpu_parts.messenger = Some(Messenger {
                loader,
                handle,
                log,
            });
        }
        // SAFETY: a plain query on a live instance.
        let pds = unsafe { instance.enumerate_physical_devices() }
            .map_err(vk_err("vkEnumeratePhysicalDevices"))?;
        let cands: Vec<Candidate> = pds
            .iter()
            .enumerate()
            .map(|(i, &pd)| probe(&instance, i, pd))
            .collect();
        let wanted = config
            .device
            .clone()
            .or_else(|| std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty()));
        let pick = choose(&cands, wanted.as_deref())?;
        let physical = cands[pick].handle;
        let all_devices = cands
            .iter()
            .map(|c| format!("{}: {} ({})", c.index, c.name, kind_name(c.kind)))
            .collect();

        let mut host_props = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut driver_props = vk::PhysicalDeviceDriverProperties::default();
        let mut m3 = vk::PhysicalDeviceMaintenance3Properties::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default()
            .push_next(&mut host_props)
            .push_next(&mut driver_props)
            .push_next(&mut m3);
        // SAFETY: `physical` belongs to `instance`; the chained structs are locals.
        unsafe { instance.get_physical_device_properties2(physical, &mut p2) };
        let props = p2.properties;
        // SAFETY: `physical` belongs to `instance`.
        let features = unsafe { instance.get_physical_device_features(physical) };
        let info = DeviceInfo {
            name: cands[pick].name.clone(),
            kind: kind_name(props.device_type),
            driver: driver_props
                .driver_name_as_c_str()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            driver_info: c_chars(&driver_props.driver_info),
            api_version: version(props.api_version),
            import_alignment: host_props.min_imported_host_pointer_alignment,
            max_allocations: props.limits.max_memory_allocation_count,
            max_allocation_size: m3.max_memory_allocation_size,
            all_devices,
            sparse_binding: features.sparse_binding == vk::TRUE,
            sparse_residency_buffer: features.sparse_residency_buffer == vk::TRUE,
        };
        // SAFETY: as above.
        let memory = unsafe { instance.get_physical_device_memory_properties(physical) };
        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(physical) };
        let family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| VulkanError::MissingFeatures {
                device: info.name.clone(),
                missing: vec!["a compute queue"],
            })? as u32;
        let prio = [1.0f32];
        let qci = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&prio)];
        let dev_exts = [ash::ext::external_memory_host::NAME.as_ptr()];
        let features = vk::PhysicalDeviceFeatures::default().shader_int64(true);
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default().buffer_device_address(true);
        let dci = vk::DeviceCreateInfo::default()
            .queue_create_infos(&qci)
            .enabled_extension_names(&dev_exts)
            .enabled_features(&features)
            .push_next(&mut v12);
        // SAFETY: every pointer in `dci` refers to locals alive across the call; the extension
        // and features were checked present in `probe`.
        let device = unsafe { instance.create_device(physical, &dci, None) }
            .map_err(vk_err("vkCreateDevice"))?;
        let emh = ash::ext::external_memory_host::Device::new(&instance, &device);
        // SAFETY: queue 0 of `family` was requested in `dci`.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let pci = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::TRANSIENT);
        // SAFETY: a live device and a plain create info.
        let pool = match unsafe { device.create_command_pool(&pci, None) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: nothing was created from the device yet.
                unsafe { device.destroy_device(None) };
                return Err(vk_err("vkCreateCommandPool")(e));
            }
        };
        let allocator = Allocator::new(&AllocatorCreateDesc {
            instance: instance.clone(),
            device: device.clone(),
            physical_device: physical,
            debug_settings: Default::default(),
            buffer_device_address: true,
            allocation_sizes: Default::default(),
        });
        let allocator = match allocator {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: the pool is unused; nothing else was created from the device.
                unsafe { device.destroy_command_pool(pool, None) };
                // SAFETY: everything made from the device is destroyed.
                unsafe { device.destroy_device(None) };
                return Err(VulkanError::Allocator { source: e });
            }
        };
        // The `Gpu` owns the instance and the messenger from here: `gpu_parts` lets go.
        gpu_parts.instance = None;
        let messenger = gpu_parts.messenger.take();
        tracing::debug!(device = %info.name, driver = %info.driver, "vulkan device open");
        Ok(Gpu {
            _entry: entry,
            instance,
            messenger,
            device,
            emh,
            queue: Mutex::new(queue),
            pool: Mutex::new(pool),
            allocator: Mutex::new(Some(allocator)),
            memory,
            info,
            direct_allocations: AtomicU32::new(0),
            allocator_allocations: AtomicU32::new(0),
            inject: Mutex::new(None),
            lost: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What was chosen.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Validation errors reported so far (0 when validation is off).
    pub fn validation_errors(&self) -> u64 {
        self.messenger
            .as_ref()
            .map_or(0, |m| m.log.errors.load(Ordering::Relaxed))
    }

    /// Validation warnings reported so far.
    pub fn validation_warnings(&self) -> u64 {
        self.messenger
            .as_ref()
            .map_or(0, |m| m.log.warnings.load(Ordering::Relaxed))
    }

    /// The validation counts, readable after this `Gpu` is dropped (zero when validation is
    /// off).
    pub fn validation(&self) -> ValidationCounts {
        ValidationCounts(
            self.messenger
                .as_ref()
                .map_or_else(Default::default, |m| m.log.clone()),
        )
    }

    /// Device memory objects of host imports, and gpu-allocator allocations, alive now.
    pub fn live_allocations(&self) -> (u32, u32) {
        (
            self.direct_allocations.load(Ordering::Relaxed),
            self.allocator_allocations.load(Ordering::Relaxed),
        )
    }

    /// Makes one call the validation layer reports as an error (a zero-sized buffer, created
    /// and destroyed at once): for tests that the error count is live.
    #[doc(hidden)]
    pub fn provoke_validation_error(&self) {
        let info = vk::BufferCreateInfo::default()
            .size(0)
            .usage(vk::BufferUsageFlags::STORAGE_BUFFER);
        // SAFETY: a live device; the invalid size is what the layer reports, and the driver
        // creates (or refuses) an unused buffer.
        if let Ok(b) = unsafe { self.device.create_buffer(&info, None) } {
            // SAFETY: the buffer was just created and is unused.
            unsafe { self.device.destroy_buffer(b, None) };
        }
    }

    /// Whether the validation layer is on.
    pub fn validation_enabled(&self) -> bool {
        self.messenger.is_some()
    }

    /// Makes the next matching driver call fail. See [`InjectedFailure`].
    pub fn inject_failure(&self, failure: InjectedFailure) {
        *lock(&self.inject) = Some(failure);
    }

    /// Takes the injected failure if it is `kind`.
    pub(crate) fn take_injected(&self, kind: InjectedFailure) -> bool {
        let mut g = lock(&self.inject);
        if *g == Some(kind) {
            *g = None;
            true
        } else {
            false
        }
    }

    /// Whether the device was lost (then every later submission fails at once).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Maps a failed call's error, recording device loss.
    pub(crate) fn check<T>(&self, r: Result<T>) -> Result<T> {
        if matches!(r, Err(VulkanError::DeviceLost)) {
            self.mark_lost();
        }
        r
    }

    /// The allocator, locked. `None` only while the `Gpu` is being dropped.
    pub(crate) fn allocator(&self) -> MutexGuard<'_, Option<Allocator>> {
        lock(&self.allocator)
    }

    pub(crate) fn queue(&self) -> MutexGuard<'_, vk::Queue> {
        lock(&self.queue)
    }

    pub(crate) fn pool(&self) -> MutexGuard<'_, vk::CommandPool> {
        lock(&self.pool)
    }

    /// The first memory type among `bits` with all of `flags`, else the first among `bits`.
    pub(crate) fn memory_type(&self, bits: u32, flags: vk::MemoryPropertyFlags) -> Option<u32> {
        let n = self.memory.memory_type_count as usize;
        let types = &self.memory.memory_types[..n];
        let ok = |i: usize| bits & (1 << i) != 0;
        (0..n)
            .find(|&i| ok(i) && types[i].property_flags.contains(flags))
            .or_else(|| (0..n).find(|&i| ok(i)))
            .map(|i| i as u32)
    }
}

/// What `Gpu::new` made so far, destroyed if it returns early.
struct Partial {
    instance: Option<ash::Instance>,
    messenger: Option<Messenger>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(m) = self.messenger.take() {
            // SAFETY: the messenger was created from this instance and is destroyed once.
            unsafe { m.loader.destroy_debug_utils_messenger(m.handle, None) };
        }
        if let Some(i) = self.instance.take() {
            // SAFETY: nothing made from the instance is alive any more.
            unsafe { i.destroy_instance(None) };
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: waits for the device; the handle is live.
        let _ = unsafe { self.device.device_wait_idle() };
        let leaks = self.allocator_allocations.load(Ordering::Relaxed);
        if leaks != 0 {
            tracing::error!(leaks, "gpu-allocator allocations left at teardown");
        }
        drop(lock(&self.allocator).take());
        let pool = *lock(&self.pool);
        // SAFETY: every command buffer from the pool completed (device idle) and is freed.
        unsafe { self.device.destroy_command_pool(pool, None) };
        // SAFETY: everything made from the device (allocator blocks, pool, the mirrors' objects,
        // which hold an `Arc<Gpu>`) is gone.
        unsafe { self.device.destroy_device(None) };
        if let Some(m) = self.messenger.take() {
            // SAFETY: created from this instance, destroyed once, before the instance.
            unsafe { m.loader.destroy_debug_utils_messenger(m.handle, None) };
        }
        // SAFETY: the device and messenger, all that was made from the instance, are gone.
        unsafe { self.instance.destroy_instance(None) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, name: &str, kind: vk::PhysicalDeviceType, ok: bool) -> Candidate {
        Candidate {
            index,
            handle: vk::PhysicalDevice::null(),
            name: name.into(),
            kind,
            missing: if ok {
                vec![]
            } else {
                vec!["bufferDeviceAddress"]
            },
        }
    }

    #[test]
    fn discrete_gpu_is_preferred_over_lavapipe() {
        let c = [
            cand(
                0,
                "llvmpipe (LLVM 15.0.6, 256 bits)",
                vk::PhysicalDeviceType::CPU,
                true,
            ),
            cand(1, "NVIDIA H200", vk::PhysicalDeviceType::DISCRETE_GPU, true),
        ];
        assert_eq!(choose(&c, None).unwrap(), 1);
    }

    #[test]
    fn a_device_lacking_features_is_passed_over() {
        let c = [
            cand(0, "old GPU", vk::PhysicalDeviceType::DISCRETE_GPU, false),
            cand(1, "llvmpipe", vk::PhysicalDeviceType::CPU, true),
        ];
        assert_eq!(choose(&c, None).unwrap(), 1);
    }

    #[test]
    fn override_by_index_or_name_and_missing_features_are_named() {
        let c = [
            cand(0, "old GPU", vk::PhysicalDeviceType::DISCRETE_GPU, false),
            cand(1, "llvmpipe", vk::PhysicalDeviceType::CPU, true),
        ];
        assert_eq!(choose(&c, Some("1")).unwrap(), 1);
        assert_eq!(choose(&c, Some("LLVMPIPE")).unwrap(), 1);
        match choose(&c, Some("old")) {
            Err(VulkanError::MissingFeatures { missing, .. }) => {
                assert_eq!(missing, vec!["bufferDeviceAddress"])
            }
            other => panic!("expected MissingFeatures, got {other:?}"),
        }
        assert!(matches!(
            choose(&c, Some("radeon")),
            Err(VulkanError::NoMatchingDevice { .. })
        ));
        assert!(matches!(choose(&[], None), Err(VulkanError::NoDevice)));
    }
}
