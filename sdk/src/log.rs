//! Logging into Weir's logs, tagged with the filter's name. A line is at most 4 KiB, and a
//! call (a phase, or `init`) writes at most 100 lines: past that the host drops them.

use crate::host;
use crate::wit::weir::filter::types::LogLevel;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the filter handled.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    pub(crate) fn wit(self) -> LogLevel {
        match self {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        }
    }
}

/// Whether a level is enabled (skip building expensive messages). Weir sets its levels when it
/// starts; the answer is asked of the host once per level and instance, then remembered.
pub fn enabled(level: Level) -> bool {
    host::log_enabled(level.wit())
}

/// Writes a log line at a level.
pub fn write(level: Level, message: &str) {
    host::log_write(level.wit(), message)
}

/// Writes an info line.
pub fn info(message: &str) {
    write(Level::Info, message)
}

/// Writes a warning.
pub fn warn(message: &str) {
    write(Level::Warn, message)
}

/// Writes an error line.
pub fn error(message: &str) {
    write(Level::Error, message)
}

/// Writes a debug line.
pub fn debug(message: &str) {
    write(Level::Debug, message)
}
