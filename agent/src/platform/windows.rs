//! The agent's platform layer on Windows: the Win32 API through `windows-sys`.
//!
//! The only module of Ferry allowed `unsafe`: every block calls one Win32
//! function (or reads what it filled in) and says why that is sound.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::os::windows::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::PathBuf;
use std::time::Duration;

use windows_sys::Win32::Foundation::{
    CloseHandle, GetLastError, LocalFree, ERROR_FILE_NOT_FOUND, ERROR_SUCCESS, FILETIME, HANDLE, WIN32_ERROR,
};
use windows_sys::Win32::Security::Cryptography::{
    CryptProtectData, CryptUnprotectData, CRYPTPROTECT_UI_FORBIDDEN, CRYPT_INTEGER_BLOB,
};
use windows_sys::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
use windows_sys::Win32::System::Registry::{
    RegCloseKey, RegCreateKeyExW, RegDeleteKeyValueW, RegSetValueExW, HKEY, HKEY_CURRENT_USER, KEY_SET_VALUE,
    REG_OPTION_NON_VOLATILE, REG_SZ,
};
use windows_sys::Win32::System::SystemInformation::GetTickCount64;
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetProcessTimes, OpenProcess, QueryFullProcessImageNameW, PROCESS_NAME_WIN32,
    PROCESS_QUERY_LIMITED_INFORMATION,
};
use windows_sys::Win32::UI::Input::KeyboardAndMouse::{GetLastInputInfo, LASTINPUTINFO};
use windows_sys::Win32::UI::WindowsAndMessaging::{
    GetForegroundWindow, GetWindowTextLengthW, GetWindowTextW, GetWindowThreadProcessId,
};

use super::{quote_windows_arg, AutostartEntry, Desktop, ForegroundWindow, PlatformError, Usage, AUTOSTART_NAME};

/// The per-user autostart key, below `HKEY_CURRENT_USER`.
const RUN_KEY: &str = r"Software\Microsoft\Windows\CurrentVersion\Run";

/// The error of a failed call, from `GetLastError`.
fn last_error(call: &'static str) -> PlatformError {
    // SAFETY: GetLastError only reads this thread's last-error value.
    let code = unsafe { GetLastError() };
    win32_error(call, code)
}

/// The error of a call that returned a `WIN32_ERROR` code.
fn win32_error(call: &'static str, code: WIN32_ERROR) -> PlatformError {
    // Win32 error codes are DWORDs; io::Error keeps them as i32 bit patterns.
    let message = std::io::Error::from_raw_os_error(code as i32).to_string();
    PlatformError::Call { call, message }
}

/// `s` as a NUL-terminated UTF-16 string.
fn wide(s: &str) -> Vec<u16> {
    std::ffi::OsStr::new(s).encode_wide().chain(std::iter::once(0)).collect()
}

/// Closes a process handle when dropped.
struct OwnedHandle(HANDLE);

impl Drop for OwnedHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful OpenProcess and is closed once, here.
        unsafe { CloseHandle(self.0) };
    }
}

/// Closes a registry key when dropped.
struct OwnedKey(HKEY);

impl Drop for OwnedKey {
    fn drop(&mut self) {
        // SAFETY: the key came from a successful RegCreateKeyExW and is closed once, here.
        unsafe { RegCloseKey(self.0) };
    }
}

/// The interactive desktop of this session. It holds no handles: every
/// question asks the system afresh.
#[derive(Debug)]
struct Win32Desktop;

pub(super) fn desktop() -> Result<Box<dyn Desktop>, PlatformError> {
    Ok(Box::new(Win32Desktop))
}

impl Desktop for Win32Desktop {
    fn foreground(&mut self) -> Result<Option<ForegroundWindow>, PlatformError> {
        // SAFETY: no arguments; returns a window handle or null.
        let hwnd = unsafe { GetForegroundWindow() };
        if hwnd.is_null() {
            return Ok(None);
        }
        // The window may close between these calls: then the text is empty
        // and the pid 0, which is reported as it is rather than as an error.
        // SAFETY: hwnd is a window handle (possibly stale, which the call tolerates).
        let len = unsafe { GetWindowTextLengthW(hwnd) };
        let mut buf = vec![0u16; usize::try_from(len).unwrap_or(0) + 1];
        let cap = i32::try_from(buf.len()).unwrap_or(i32::MAX);
        // SAFETY: buf holds `cap` u16s; the call writes at most cap - 1 of them plus a NUL.
        let copied = unsafe { GetWindowTextW(hwnd, buf.as_mut_ptr(), cap) };
        buf.truncate(usize::try_from(copied).unwrap_or(0));
        let title = String::from_utf16_lossy(&buf);
        let mut pid = 0u32;
        // SAFETY: pid is a valid u32 to write the process id to.
        unsafe { GetWindowThreadProcessId(hwnd, &mut pid) };
        let exe = if pid == 0 { None } else { process_image(pid) };
        Ok(Some(ForegroundWindow { title, pid, exe }))
    }

    fn idle(&mut self) -> Result<Duration, PlatformError> {
        let mut info = LASTINPUTINFO {
            cbSize: size_of::<LASTINPUTINFO>() as u32,
            dwTime: 0,
        };
        // SAFETY: info is a LASTINPUTINFO with cbSize set, as the call requires.
        if unsafe { GetLastInputInfo(&mut info) } == 0 {
            return Err(last_error("GetLastInputInfo"));
        }
        // SAFETY: no arguments.
        let now = unsafe { GetTickCount64() };
        Ok(super::idle_from_ticks(now, info.dwTime))
    }
}

/// Full path of process `pid`'s executable; `None` when the system refuses
/// (elevated or protected processes, a process that has just exited).
fn process_image(pid: u32) -> Option<PathBuf> {
    // SAFETY: plain call; a null result means failure and is checked.
    let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if handle.is_null() {
        return None;
    }
    let handle = OwnedHandle(handle);
    // Long paths (\\?\...) can exceed MAX_PATH: grow the buffer when asked to.
    let mut cap = 512u32;
    loop {
        let mut buf = vec![0u16; cap as usize];
        let mut size = cap;
        // SAFETY: buf holds `size` u16s; on success size is set to the characters written (no NUL).
        let ok = unsafe { QueryFullProcessImageNameW(handle.0, PROCESS_NAME_WIN32, buf.as_mut_ptr(), &mut size) };
        if ok != 0 {
            buf.truncate(size as usize);
            return Some(PathBuf::from(OsString::from_wide(&buf)));
        }
        if cap >= 32_768 {
            return None;
        }
        cap *= 4;
    }
}

/// A FILETIME span (100 ns units) as a duration.
fn filetime(t: FILETIME) -> Duration {
    let ticks = (u64::from(t.dwHighDateTime) << 32) | u64::from(t.dwLowDateTime);
    Duration::from_nanos(ticks.saturating_mul(100))
}

pub(super) fn process_usage() -> Result<Usage, PlatformError> {
    // SAFETY: returns the pseudo-handle of this process; it needs no closing.
    let me = unsafe { GetCurrentProcess() };
    let zero = FILETIME {
        dwLowDateTime: 0,
        dwHighDateTime: 0,
    };
    let (mut created, mut exited, mut kernel, mut user) = (zero, zero, zero, zero);
    // SAFETY: four valid FILETIMEs to write to, and a valid process handle.
    if unsafe { GetProcessTimes(me, &mut created, &mut exited, &mut kernel, &mut user) } == 0 {
        return Err(last_error("GetProcessTimes"));
    }
    // SAFETY: PROCESS_MEMORY_COUNTERS is plain data; all-zero is a valid value.
    let mut mem: PROCESS_MEMORY_COUNTERS = unsafe { std::mem::zeroed() };
    mem.cb = size_of::<PROCESS_MEMORY_COUNTERS>() as u32;
    // SAFETY: mem is a PROCESS_MEMORY_COUNTERS of the size passed as cb.
    if unsafe { K32GetProcessMemoryInfo(me, &mut mem, mem.cb) } == 0 {
        return Err(last_error("K32GetProcessMemoryInfo"));
    }
    Ok(Usage {
        cpu: filetime(kernel) + filetime(user),
        rss_bytes: mem.WorkingSetSize as u64,
    })
}

/// Copies a blob DPAPI allocated and frees it with `LocalFree`.
fn take_blob(blob: CRYPT_INTEGER_BLOB) -> Vec<u8> {
    if blob.pbData.is_null() {
        return Vec::new();
    }
    // SAFETY: DPAPI returned pbData pointing to cbData initialised bytes.
    let out = unsafe { std::slice::from_raw_parts(blob.pbData, blob.cbData as usize) }.to_vec();
    // SAFETY: pbData was allocated by DPAPI with LocalAlloc and is freed once, here.
    unsafe { LocalFree(blob.pbData.cast()) };
    out
}

/// `data` as an input blob. DPAPI does not write through the pointer.
fn in_blob(data: &[u8]) -> Result<CRYPT_INTEGER_BLOB, PlatformError> {
    Ok(CRYPT_INTEGER_BLOB {
        cbData: u32::try_from(data.len()).map_err(|_| PlatformError::Call {
            call: "CryptProtectData",
            message: format!("{} bytes is too large", data.len()),
        })?,
        pbData: data.as_ptr().cast_mut(),
    })
}

fn empty_blob() -> CRYPT_INTEGER_BLOB {
    CRYPT_INTEGER_BLOB {
        cbData: 0,
        pbData: std::ptr::null_mut(),
    }
}

pub(super) fn protect_key(raw: &[u8]) -> Result<Vec<u8>, PlatformError> {
    let input = in_blob(raw)?;
    let description = wide("Ferry agent spool key");
    let mut out = empty_blob();
    // SAFETY: input points to raw.len() readable bytes, description is
    // NUL-terminated, the optional arguments are null, out is written on success.
    let ok = unsafe {
        CryptProtectData(
            &input,
            description.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_UI_FORBIDDEN,
            &mut out,
        )
    };
    if ok == 0 {
        return Err(last_error("CryptProtectData"));
    }
    Ok(take_blob(out))
}

pub(super) fn unprotect_key(stored: &[u8]) -> Result<Vec<u8>, PlatformError> {
    let input = in_blob(stored)?;
    let mut out = empty_blob();
    // SAFETY: input points to stored.len() readable bytes, the description
    // is not asked for (null), the optional arguments are null, out is
    // written on success.
    let ok = unsafe {
        CryptUnprotectData(
            &input,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_UI_FORBIDDEN,
            &mut out,
        )
    };
    if ok == 0 {
        return Err(last_error("CryptUnprotectData"));
    }
    Ok(take_blob(out))
}

/// Where the entry lives, as people write registry paths.
fn location() -> String {
    format!(r"HKCU\{RUN_KEY}\{AUTOSTART_NAME}")
}

pub(super) fn install_autostart(command: &[String]) -> Result<AutostartEntry, PlatformError> {
    let line: Vec<String> = command.iter().map(|a| quote_windows_arg(a)).collect();
    let value = wide(&line.join(" "));
    let bytes = u32::try_from(value.len() * 2).map_err(|_| PlatformError::Call {
        call: "RegSetValueExW",
        message: format!("command line of {} characters is too long", value.len()),
    })?;
    let subkey = wide(RUN_KEY);
    let name = wide(AUTOSTART_NAME);
    let mut key: HKEY = std::ptr::null_mut();
    // SAFETY: subkey is NUL-terminated, class and security attributes are
    // null (defaults), key receives the opened key on success.
    let rc = unsafe {
        RegCreateKeyExW(
            HKEY_CURRENT_USER,
            subkey.as_ptr(),
            0,
            std::ptr::null(),
            REG_OPTION_NON_VOLATILE,
            KEY_SET_VALUE,
            std::ptr::null(),
            &mut key,
            std::ptr::null_mut(),
        )
    };
    if rc != ERROR_SUCCESS {
        return Err(win32_error("RegCreateKeyExW", rc));
    }
    let key = OwnedKey(key);
    // SAFETY: name is NUL-terminated; value is `bytes` bytes of UTF-16
    // including its terminating NUL, as REG_SZ requires.
    let rc = unsafe { RegSetValueExW(key.0, name.as_ptr(), 0, REG_SZ, value.as_ptr().cast(), bytes) };
    if rc != ERROR_SUCCESS {
        return Err(win32_error("RegSetValueExW", rc));
    }
    Ok(AutostartEntry { location: location() })
}

pub(super) fn uninstall_autostart() -> Result<Option<AutostartEntry>, PlatformError> {
    let subkey = wide(RUN_KEY);
    let name = wide(AUTOSTART_NAME);
    // SAFETY: both strings are NUL-terminated.
    let rc = unsafe { RegDeleteKeyValueW(HKEY_CURRENT_USER, subkey.as_ptr(), name.as_ptr()) };
    match rc {
        ERROR_SUCCESS => Ok(Some(AutostartEntry { location: location() })),
        // A missing key or value: nothing was registered.
        ERROR_FILE_NOT_FOUND => Ok(None),
        code => Err(win32_error("RegDeleteKeyValueW", code)),
    }
}
