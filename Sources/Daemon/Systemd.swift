import CSystemd
import Foundation

/// sd_notify(3) messages to systemd; no-ops when not started by systemd (NOTIFY_SOCKET unset).
public enum Systemd {
    public static func notify(_ state: String) {
        _ = sd_notify(0, state)
    }

    public static func ready(status: String) { notify("READY=1\nSTATUS=\(status)") }
    public static func status(_ text: String) { notify("STATUS=\(text)") }
    public static func stopping(status: String) { notify("STOPPING=1\nSTATUS=\(status)") }
    public static func watchdog() { notify("WATCHDOG=1") }

    /// The interval at which WATCHDOG=1 must be sent (half of WATCHDOG_USEC), or nil when the
    /// watchdog is off for this process.
    public static var watchdogInterval: Double? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return Double(usec) / 1e6 / 2
    }
}
