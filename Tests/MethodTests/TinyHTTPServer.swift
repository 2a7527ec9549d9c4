import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A minimal HTTP/1.1 server on 127.0.0.1 over POSIX sockets, for testing the LLM client: it accepts
/// connections one at a time, records each request, and answers with `respond(head, body)`
/// (nil: never answer, to provoke a timeout). Every response closes its connection.
final class TinyHTTPServer: @unchecked Sendable {
    struct Request { var head: String; var body: Data }

    let port: UInt16
    private let listener: Int32
    private let lock = NSLock()
    private var recorded: [Request] = []
    private var hung: [Int32] = []
    private let respond: @Sendable (String, Data) -> (status: Int, body: String)?
    private let done = DispatchSemaphore(value: 0)

    init(respond: @escaping @Sendable (String, Data) -> (status: Int, body: String)?) throws {
        self.respond = respond
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        guard listener >= 0 else { throw POSIXError(.EIO) }
        var yes: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        guard bound == 0, listen(listener, 8) == 0 else { close(listener); throw POSIXError(.EADDRINUSE) }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        port = UInt16(bigEndian: address.sin_port)
        let thread = Thread { [self] in serve() }
        thread.start()
    }

    var url: URL { URL(string: "http://127.0.0.1:\(port)/v1")! }

    var requests: [Request] { lock.lock(); defer { lock.unlock() }; return recorded }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        done.wait()
        lock.lock(); for fd in hung { close(fd) }; lock.unlock()
    }

    private func serve() {
        defer { done.signal() }
        while true {
            let connection = accept(listener, nil, nil)
            if connection < 0 { return }
            guard let (head, body) = readRequest(connection) else { close(connection); continue }
            lock.lock(); recorded.append(Request(head: head, body: body)); lock.unlock()
            guard let (status, text) = respond(head, body) else {
                lock.lock(); hung.append(connection); lock.unlock()
                continue
            }
            let payload = Array(text.utf8)
            let header = "HTTP/1.1 \(status) X\r\nContent-Type: application/json\r\nContent-Length: \(payload.count)\r\nConnection: close\r\n\r\n"
            let bytes = Array(header.utf8) + payload
            var sent = 0
            while sent < bytes.count {
                let n = bytes[sent...].withUnsafeBufferPointer { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { break }
                sent += n
            }
            close(connection)
        }
    }

    private func readRequest(_ fd: Int32) -> (String, Data)? {
        var buffer = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        let separator: [UInt8] = [13, 10, 13, 10]
        var headEnd: Int?
        var contentLength = 0
        while true {
            if headEnd == nil, let range = findSeparator(buffer, separator) {
                headEnd = range
                let head = String(decoding: buffer[..<range], as: UTF8.self)
                for line in head.split(separator: "\r\n") where line.lowercased().hasPrefix("content-length:") {
                    contentLength = Int(line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? 0
                }
            }
            if let end = headEnd, buffer.count >= end + 4 + contentLength {
                return (String(decoding: buffer[..<end], as: UTF8.self), Data(buffer[(end + 4)..<(end + 4 + contentLength)]))
            }
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { return nil }
            buffer += chunk[..<n]
        }
    }

    private func findSeparator(_ buffer: [UInt8], _ separator: [UInt8]) -> Int? {
        guard buffer.count >= separator.count else { return nil }
        for i in 0...(buffer.count - separator.count) where Array(buffer[i..<(i + separator.count)]) == separator { return i }
        return nil
    }
}
