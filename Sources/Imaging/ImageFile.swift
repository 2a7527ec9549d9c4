import Foundation

/// A file's location as the bytes the kernel sees. File names on Linux are bytes, not text: a name
/// that is not valid UTF-8 cannot be a Swift `String` or `URL` without loss, but it opens from here.
public struct ImageFile: Sendable, Hashable {
    /// The path's bytes, without a terminating NUL.
    public let pathBytes: [UInt8]

    public init(pathBytes: [UInt8]) {
        self.pathBytes = pathBytes
    }

    public init(path: String) {
        self.init(pathBytes: Array(path.utf8))
    }

    public init(url: URL) {
        self.init(path: url.path)
    }

    /// `folder` joined with `relative` ('/'-separated bytes).
    public init(folder: String, relative: [UInt8]) {
        var bytes = Array(folder.utf8)
        if bytes.last != 0x2F { bytes.append(0x2F) }
        self.init(pathBytes: bytes + relative)
    }

    /// The path for messages: the text itself when it is valid UTF-8, otherwise `ImageFile.escaped`.
    public var displayPath: String {
        ImageFile.escaped(pathBytes)
    }

    /// Runs `body` with the path as a NUL-terminated C string.
    func withCString<T>(_ body: (UnsafePointer<CChar>) throws -> T) rethrows -> T {
        try (pathBytes.map { CChar(bitPattern: $0) } + [0]).withUnsafeBufferPointer { try body($0.baseAddress!) }
    }

    /// The bytes as text, with every byte that is not part of valid UTF-8 written as `\xNN` (uppercase
    /// hex). Valid UTF-8 comes back unchanged; together with the bytes themselves (kept wherever this
    /// form is stored) nothing is lost.
    public static func escaped(_ bytes: [UInt8]) -> String {
        if let text = String(validating: bytes, as: UTF8.self) { return text }
        var out = ""
        var i = 0
        while i < bytes.count {
            // The valid UTF-8 sequence starting at i, if any (one scalar, 1 to 4 bytes).
            var decoded: String?
            for length in 1...4 where i + length <= bytes.count {
                if let s = String(validating: bytes[i..<(i + length)], as: UTF8.self), s.unicodeScalars.count == 1 {
                    decoded = s
                    i += length
                    break
                }
            }
            if let decoded { out += decoded } else { out += String(format: "\\x%02X", bytes[i]); i += 1 }
        }
        return out
    }
}
