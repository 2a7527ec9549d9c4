import Dispatch
import Foundation

/// A pipe whose read end joins the daemon's poll(2): writing to it wakes the main loop
/// (a signal arrived, a job finished).
final class WakePipe: @unchecked Sendable {
    let readFD: Int32
    private let writeFD: Int32

    init() {
        var fds: [Int32] = [0, 0]
        precondition(pipe(&fds) == 0, "pipe() failed")
        readFD = fds[0]
        writeFD = fds[1]
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }

    func wake() {
        var b: UInt8 = 1
        _ = write(writeFD, &b, 1)
    }

    func drain() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while read(readFD, &buffer, buffer.count) > 0 {}
    }

    deinit {
        close(readFD)
        close(writeFD)
    }
}

/// Delivers SIGTERM/SIGINT through DispatchSource instead of the default "die now".
public final class SignalWatcher {
    private var sources: [DispatchSourceSignal] = []

    public init(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) {
        for s in signals {
            signal(s, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: s, queue: .global())
            source.setEventHandler { handler(s) }
            source.resume()
            sources.append(source)
        }
    }

    public func cancel() {
        for s in sources { s.cancel() }
        sources = []
    }
}

/// Waits until `fd` (or the wake pipe) is readable or `timeout` seconds pass. `fd` < 0 waits on the pipe only.
func waitReadable(_ fd: Int32, wake: WakePipe, timeout: Double) {
    var fds = [pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
    if fd >= 0 { fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
    let ms = Int32(max(0, min(timeout, 3600)) * 1000)
    _ = poll(&fds, nfds_t(fds.count), ms)
    wake.drain()
}
