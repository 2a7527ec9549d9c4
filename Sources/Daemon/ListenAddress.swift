import Foundation

/// An IP address and TCP port to listen on, parsed from `host:port` (`127.0.0.1:9464`, `[::1]:9464`,
/// `localhost:9464`). Host names other than `localhost` are refused: a listener binds an address, and
/// a name that resolves differently later would move it.
public struct ListenAddress: Equatable, Sendable, CustomStringConvertible {
    public enum Family: Sendable, Equatable { case ipv4, ipv6 }
    /// The numeric address (`localhost` becomes 127.0.0.1).
    public let host: String
    public let port: UInt16
    public let family: Family

    public init(parsing text: String, key: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces)
        func refuse(_ why: String) -> NoladError {
            NoladError(.config, "\(key) \"\(text)\" \(why); write host:port, e.g. 127.0.0.1:9464 or [::1]:9464")
        }
        let hostPart: Substring, portPart: Substring
        if t.hasPrefix("[") {
            guard let close = t.firstIndex(of: "]") else { throw refuse("has an unclosed [") }
            hostPart = t[t.index(after: t.startIndex)..<close]
            let rest = t[t.index(after: close)...]
            guard rest.hasPrefix(":") else { throw refuse("has no :port after the ]") }
            portPart = rest.dropFirst()
        } else {
            guard let colon = t.lastIndex(of: ":") else { throw refuse("has no port") }
            hostPart = t[..<colon]
            portPart = t[t.index(after: colon)...]
            if hostPart.contains(":") { throw refuse("is an IPv6 address without brackets") }
        }
        guard let port = Int(portPart), (1...65535).contains(port) else {
            throw refuse("has port \"\(portPart)\", which is not a number from 1 to 65535")
        }
        self.port = UInt16(port)
        let h = String(hostPart)
        var v4 = in_addr(), v6 = in6_addr()
        if h.lowercased() == "localhost" {
            host = "127.0.0.1"; family = .ipv4
        } else if inet_pton(AF_INET, h, &v4) == 1 {
            host = h; family = .ipv4
        } else if inet_pton(AF_INET6, h, &v6) == 1 {
            host = h; family = .ipv6
        } else if h.isEmpty {
            throw refuse("has no host (an empty host would listen on every interface)")
        } else {
            throw refuse("names the host \"\(h)\", which is not an IP address or localhost")
        }
    }

    /// 127.0.0.0/8 or ::1 (and ::ffff:127.x.y.z).
    public var isLoopback: Bool {
        switch family {
        case .ipv4:
            return host.split(separator: ".").first == "127"
        case .ipv6:
            var a = in6_addr()
            guard inet_pton(AF_INET6, host, &a) == 1 else { return false }
            let b = withUnsafeBytes(of: a) { Array($0) }
            if b[0..<15].allSatisfy({ $0 == 0 }) && b[15] == 1 { return true }
            return b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xff && b[11] == 0xff && b[12] == 127
        }
    }

    public var description: String { family == .ipv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
