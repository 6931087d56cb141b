//! Process exit codes, distinct per failure class so scripts and systemd
//! (`RestartPreventExitStatus=`) can tell a bad config from a crash. Values
//! follow sysexits.h.

/// Success.
pub const OK: i32 = 0;
/// A runtime failure not covered below.
pub const FAILURE: i32 = 1;
/// Wrong command-line usage.
pub const USAGE: i32 = 64;
/// Bad input data (malformed id, key or ticket given on the command line).
pub const DATA: i32 = 65;
/// A needed peer (the helper, a server, the agent) is unreachable.
pub const UNAVAILABLE: i32 = 69;
/// An internal error.
pub const SOFTWARE: i32 = 70;
/// An operating-system error (socket, file, device).
pub const OS: i32 = 71;
/// Permission denied, or refusing to run with too much privilege.
pub const NOPERM: i32 = 77;
/// The configuration is missing or invalid.
pub const CONFIG: i32 = 78;

/// Prints `program: error: message` on stderr (one line) and exits with `code`.
pub fn fail(program: &str, message: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("{program}: error: {message}");
    std::process::exit(code)
}
