import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// safetensors (https://github.com/huggingface/safetensors), the format:
//   [8 bytes: N, u64 little-endian][N bytes: JSON header, may end in spaces][byte buffer]
// header: {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
// offsets are relative to the byte buffer; the tensors cover the buffer exactly, without holes or overlaps
// (the reference reader rejects anything else, and so do we). Values are little-endian, row-major.

/// Element sizes of the dtypes the format defines. Only F32, F16 and BF16 can be read as floats;
/// the others are accepted in a file (e.g. int64 `position_ids` buffers) and rejected on access.
let safeTensorsDTypeSizes: [String: Int] = [
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
]

/// The float encodings a checkpoint tensor can be read from.
enum FloatEncoding {
    case f32, f16, bf16

    init?(safeTensorsDType: String) {
        switch safeTensorsDType {
        case "F32": self = .f32
        case "F16": self = .f16
        case "BF16": self = .bf16
        default: return nil
        }
    }

    var byteCount: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        }
    }
}

/// Converts `count` little-endian values starting at `source` (any alignment) into `destination`.
func decodeFloats(_ encoding: FloatEncoding, from source: UnsafeRawPointer, count: Int,
                  into destination: UnsafeMutablePointer<Float>) {
    switch encoding {
    case .f32:
        memcpy(destination, source, count * 4)
    case .f16:
        for i in 0..<count {
            let bits = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
            destination[i] = floatFromHalfBits(bits)
        }
    case .bf16:
        for i in 0..<count {
            let bits = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
            destination[i] = Float(bitPattern: UInt32(bits) << 16)
        }
    }
}

/// IEEE 754 binary16 → binary32, exact for every input (subnormals, ±inf, NaN payloads kept).
@inline(__always)
func floatFromHalfBits(_ h: UInt16) -> Float {
    let sign = UInt32(h & 0x8000) << 16
    let exponent = UInt32(h >> 10) & 0x1F
    let mantissa = UInt32(h & 0x03FF)
    if exponent == 0x1F {                       // inf or NaN
        return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
    }
    if exponent == 0 {                          // zero or subnormal: mantissa · 2^-24, exact in Float
        let magnitude = Float(mantissa) * 0x1p-24
        return sign == 0 ? magnitude : -magnitude
    }
    return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
}

/// A read-only memory mapping of a whole file; unmapped when released.
final class MappedFile: @unchecked Sendable {
    let path: String
    let base: UnsafeRawPointer?
    let count: Int

    init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            if errno == ENOENT { throw CheckpointError.missingFile(path) }
            throw CheckpointError.unreadable(file: path, reason: reason)
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw CheckpointError.unreadable(file: path, reason: String(cString: strerror(errno)))
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw CheckpointError.unreadable(file: path, reason: "not a regular file")
        }
        count = Int(info.st_size)
        if count == 0 {
            base = nil
            return
        }
        let mapped = mmap(nil, count, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            throw CheckpointError.unreadable(file: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
        }
        base = UnsafeRawPointer(mapped)
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), count) }
    }

    /// The little-endian integer at `offset`; the caller checked the bounds.
    func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        return T(littleEndian: base!.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    /// Tells the kernel the pages of `range` are not needed any more: a tensor copied out of the map
    /// then no longer counts in the resident set twice (pages are re-read from the file if touched again).
    func dropPages(_ range: Range<Int>) {
        guard let base, !range.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = range.lowerBound / page * page
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), range.upperBound - start, MADV_DONTNEED)
    }

    func bytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)
    }
}

/// A memory-mapped `.safetensors` file. Opening validates the whole header against the file size;
/// values are converted to Float32 only when asked for.
public final class SafeTensorsFile: TensorSource, @unchecked Sendable {
    struct Entry {
        let dtype: String
        let shape: [Int]
        let begin: Int      // absolute file offsets
        let end: Int
    }

    public let path: String
    /// The header's `__metadata__` (empty when absent).
    public let metadata: [String: String]
    let entries: [String: Entry]
    let file: MappedFile

    public convenience init(url: URL) throws {
        try self.init(path: url.path)
    }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        func bad(_ reason: String) -> CheckpointError { .unreadable(file: path, reason: reason) }

        guard file.count >= 8 else { throw bad("file is \(file.count) bytes, shorter than the 8-byte header length") }
        let headerLength = file.loadLE(UInt64.self, at: 0)
        guard headerLength <= UInt64(file.count - 8) else {
            throw bad("header length \(headerLength) runs past the end of the file (\(file.count) bytes)")
        }
        guard headerLength <= 100_000_000 else { throw bad("header length \(headerLength) is over 100 MB") }
        let headerEnd = 8 + Int(headerLength)
        let headerBytes = file.bytes(8..<headerEnd)
        guard headerBytes.first == UInt8(ascii: "{") else { throw bad("header does not start with '{'") }

        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: Data(headerBytes), options: [])
        } catch {
            throw bad("header is not valid JSON")
        }
        guard let header = json as? [String: Any] else { throw bad("header is not a JSON object") }

        var metadata: [String: String] = [:]
        var entries: [String: Entry] = [:]
        var spans: [(begin: Int, end: Int, name: String)] = []
        for (name, value) in header {
            if name == "__metadata__" {
                guard let dict = value as? [String: Any] else { throw bad("__metadata__ is not an object") }
                for (key, item) in dict {
                    guard let text = item as? String else { throw bad("__metadata__ value of '\(key)' is not a string") }
                    metadata[key] = text
                }
                continue
            }
            guard let info = value as? [String: Any] else { throw bad("entry '\(name)' is not an object") }
            guard let dtype = info["dtype"] as? String else { throw bad("tensor '\(name)' has no dtype") }
            guard let shapeValues = info["shape"] as? [Any],
                  let shape = jsonIntegers(shapeValues), shape.allSatisfy({ $0 >= 0 }) else {
                throw bad("tensor '\(name)' has no valid shape")
            }
            guard let offsetValues = info["data_offsets"] as? [Any],
                  let offsets = jsonIntegers(offsetValues), offsets.count == 2,
                  offsets[0] >= 0, offsets[0] <= offsets[1] else {
                throw bad("tensor '\(name)' has no valid data_offsets")
            }
            guard let elementSize = safeTensorsDTypeSizes[dtype] else {
                throw CheckpointError.unsupportedDType(name: name, dtype: dtype)
            }
            var elements = 1
            for dim in shape {
                let (product, overflow) = elements.multipliedReportingOverflow(by: dim)
                guard !overflow else { throw bad("tensor '\(name)' shape \(shape) overflows") }
                elements = product
            }
            let (byteCount, overflow) = elements.multipliedReportingOverflow(by: elementSize)
            guard !overflow, offsets[1] - offsets[0] == byteCount else {
                throw bad("tensor '\(name)' has \(offsets[1] - offsets[0]) bytes, its \(dtype) shape \(shape) needs \(byteCount)")
            }
            entries[name] = Entry(dtype: dtype, shape: shape,
                                  begin: headerEnd + offsets[0], end: headerEnd + offsets[1])
            spans.append((offsets[0], offsets[1], name))
        }
        // The tensors must tile the byte buffer: no holes, no overlaps, nothing after the last one.
        // Checked in offset order, so the error names the same tensor however the header is ordered.
        spans.sort { ($0.begin, $0.end, $0.name) < ($1.begin, $1.end, $1.name) }
        let dataSize = file.count - headerEnd
        var position = 0
        for span in spans {
            guard span.end <= dataSize else {
                throw bad("tensor '\(span.name)' data [\(span.begin), \(span.end)) runs past the end of the data (\(dataSize) bytes; file truncated?)")
            }
            guard span.begin == position else {
                throw bad(span.begin < position
                          ? "tensor '\(span.name)' overlaps the previous tensor"
                          : "hole in the data before tensor '\(span.name)'")
            }
            position = span.end
        }
        guard headerEnd + position == file.count else {
            throw bad("\(file.count - headerEnd - position) bytes after the last tensor")
        }
        self.metadata = metadata
        self.entries = entries
    }

    public var tensorNames: [String] { Array(entries.keys) }

    public func shape(of name: String) -> [Int]? { entries[name]?.shape }

    /// The safetensors dtype string of `name` ("F32", "F16", "BF16", "I64", ...), nil when absent.
    public func dtype(of name: String) -> String? { entries[name]?.dtype }

    public func floats(_ name: String) throws -> [Float] {
        guard let entry = entries[name] else { throw CheckpointError.missingTensor(name) }
        guard let encoding = FloatEncoding(safeTensorsDType: entry.dtype) else {
            throw CheckpointError.unsupportedDType(name: name, dtype: entry.dtype)
        }
        let count = (entry.end - entry.begin) / encoding.byteCount
        let source = file.bytes(entry.begin..<entry.end)
        let values = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 { decodeFloats(encoding, from: source.baseAddress!, count: count, into: buffer.baseAddress!) }
            initialized = count
        }
        file.dropPages(entry.begin..<entry.end)
        return values
    }
}

/// Non-negative integers from a JSON array (NSNumber on Linux and Darwin), nil if any is not one.
func jsonIntegers(_ values: [Any]) -> [Int]? {
    var result: [Int] = []
    result.reserveCapacity(values.count)
    for value in values {
        guard let number = value as? NSNumber else { return nil }
        let integer = number.int64Value
        guard integer >= 0, integer < (1 << 62), Double(integer) == number.doubleValue else { return nil }
        result.append(Int(integer))
    }
    return result
}

/// Serialises F32 tensors as a safetensors file that `safetensors.torch.load` reads.
/// Tensors are stored in the given order; header keys are sorted; the header is padded with spaces
/// to a multiple of 8 bytes so the data is aligned. Names must be unique and not `__metadata__`,
/// and each tensor's value count must match its shape (caller bugs: preconditions).
public func writeSafeTensors(tensors: [(name: String, shape: [Int], values: [Float])],
                             metadata: [String: String] = [:]) -> [UInt8] {
    var fields: [(key: String, json: String)] = []
    var offset = 0
    var seen = Set<String>()
    for tensor in tensors {
        precondition(tensor.name != "__metadata__", "tensor name __metadata__ is reserved")
        precondition(seen.insert(tensor.name).inserted, "duplicate tensor name \(tensor.name)")
        precondition(tensor.shape.allSatisfy { $0 >= 0 } && tensor.shape.reduce(1, *) == tensor.values.count,
                     "tensor \(tensor.name): \(tensor.values.count) values for shape \(tensor.shape)")
        let end = offset + 4 * tensor.values.count
        let shape = tensor.shape.map(String.init).joined(separator: ",")
        fields.append((tensor.name, "{\"dtype\":\"F32\",\"shape\":[\(shape)],\"data_offsets\":[\(offset),\(end)]}"))
        offset = end
    }
    fields.sort { $0.key < $1.key }
    var header = "{"
    if !metadata.isEmpty {
        let items = metadata.sorted { $0.key < $1.key }
            .map { "\(jsonQuoted($0.key)):\(jsonQuoted($0.value))" }
        header += "\"__metadata__\":{\(items.joined(separator: ","))}"
        if !fields.isEmpty { header += "," }
    }
    header += fields.map { "\(jsonQuoted($0.key)):\($0.json)" }.joined(separator: ",")
    header += "}"
    var headerBytes = Array(header.utf8)
    while headerBytes.count % 8 != 0 { headerBytes.append(UInt8(ascii: " ")) }

    var out: [UInt8] = []
    out.reserveCapacity(8 + headerBytes.count + offset)
    withUnsafeBytes(of: UInt64(headerBytes.count).littleEndian) { out.append(contentsOf: $0) }
    out.append(contentsOf: headerBytes)
    for tensor in tensors {
        for value in tensor.values {
            withUnsafeBytes(of: value.bitPattern.littleEndian) { out.append(contentsOf: $0) }
        }
    }
    return out
}

/// `text` as a JSON string literal.
public func jsonQuoted(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if scalar.value < 0x20 {
                out += String(format: "\\u%04x", scalar.value)
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    return out + "\""
}
