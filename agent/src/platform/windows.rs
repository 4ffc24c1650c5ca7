//! The agent's platform layer on Windows (Win32 through `windows-sys`): to be written.
compile_error!("agent/src/platform/windows.rs is not written yet");
