import Foundation

// `pytorch_model.bin` as `torch.save(state_dict)` writes it (the zip format, torch ≥ 1.6):
//   <prefix>/data.pkl        the pickled dict; tensors are reduced through torch._utils._rebuild_tensor_v2
//                            whose storage argument is a persistent id ('storage', torch.FloatStorage, key, location, numel)
//   <prefix>/data/<key>      raw little-endian storage bytes
//   <prefix>/byteorder       "little" (absent in old files, which are little-endian)
// <prefix> is "archive" in older files and the file's stem (e.g. "pytorch_model") in newer ones.
// The pickle is read by a restricted unpickler that knows only the opcodes and globals a state dict
// uses; any other global is rejected by name and nothing is ever executed.

/// A storage type `torch.save` names in a persistent id (`torch.FloatStorage`, ...).
struct TorchStorageType {
    let name: String
    let elementSize: Int
    /// nil for storages that are not read as floats (int64 `position_ids` buffers and the like).
    let encoding: FloatEncoding?

    static let known: [String: TorchStorageType] = {
        let table: [(String, Int, FloatEncoding?)] = [
            ("FloatStorage", 4, .f32), ("HalfStorage", 2, .f16), ("BFloat16Storage", 2, .bf16),
            ("DoubleStorage", 8, nil), ("LongStorage", 8, nil), ("IntStorage", 4, nil),
            ("ShortStorage", 2, nil), ("CharStorage", 1, nil), ("ByteStorage", 1, nil), ("BoolStorage", 1, nil),
        ]
        var result: [String: TorchStorageType] = [:]
        for (name, size, encoding) in table { result["torch." + name] = TorchStorageType(name: "torch." + name, elementSize: size, encoding: encoding) }
        return result
    }()
}

/// A storage as the persistent id describes it: the archive entry `data/<key>` holding `count` elements.
struct TorchStorage {
    let type: TorchStorageType
    let key: String
    let count: Int
}

/// A strided view of a storage, from `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
struct TorchTensor {
    let storage: TorchStorage
    let offset: Int
    let shape: [Int]
    let stride: [Int]
}

/// Ordered dictionary with reference semantics, so a memoised dict sees later SETITEMS.
final class PickleDict {
    var items: [(key: PickleValue, value: PickleValue)] = []
}

final class PickleList {
    var items: [PickleValue] = []
}

/// A value on the restricted unpickler's stack.
indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case tuple([PickleValue])
    case list(PickleList)
    case dict(PickleDict)
    /// A permitted global, "module.name".
    case global(String)
    case storage(TorchStorage)
    case tensor(TorchTensor)

    var kind: String {
        switch self {
        case .none: return "None"
        case .bool: return "bool"
        case .int: return "int"
        case .float: return "float"
        case .string: return "str"
        case .tuple: return "tuple"
        case .list: return "list"
        case .dict: return "dict"
        case .global(let name): return name
        case .storage: return "storage"
        case .tensor: return "tensor"
        }
    }
}

/// The globals a state dict may reference. Everything else is refused when the GLOBAL opcode names it.
let permittedPickleGlobals: Set<String> = Set([
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
]).union(TorchStorageType.known.keys)

/// Unpickles `bytes` (the archive's data.pkl) with the restricted opcode and global set.
/// `storage` resolves a persistent id to a storage (checking that its entry exists).
struct RestrictedUnpickler {
    let bytes: UnsafeRawBufferPointer
    let file: String
    let storage: (_ type: TorchStorageType, _ key: String, _ count: Int) throws -> TorchStorage

    private func bad(_ reason: String) -> CheckpointError { .unreadable(file: file, reason: "data.pkl: " + reason) }

    func load() throws -> PickleValue {
        var stack: [PickleValue] = []
        var marks: [Int] = []
        var memo: [Int: PickleValue] = [:]
        var p = 0

        func need(_ n: Int) throws {
            guard n >= 0, p + n <= bytes.count else { throw bad("truncated at byte \(p)") }
        }
        func u8() throws -> Int { try need(1); defer { p += 1 }; return Int(bytes[p]) }
        func le<T: FixedWidthInteger>(_: T.Type) throws -> T {
            try need(MemoryLayout<T>.size)
            defer { p += MemoryLayout<T>.size }
            return T(littleEndian: bytes.loadUnaligned(fromByteOffset: p, as: T.self))
        }
        func utf8(_ n: Int) throws -> String {
            try need(n)
            defer { p += n }
            guard let text = String(validating: UnsafeRawBufferPointer(rebasing: bytes[p ..< p + n]), as: UTF8.self) else {
                throw bad("invalid UTF-8 string at byte \(p)")
            }
            return text
        }
        func line() throws -> String {
            var end = p
            while end < bytes.count, bytes[end] != 0x0A { end += 1 }
            guard end < bytes.count else { throw bad("truncated at byte \(p)") }
            let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[p ..< end]), as: UTF8.self)
            p = end + 1
            return text
        }
        func pop() throws -> PickleValue {
            guard let value = stack.popLast(), stack.count >= (marks.last ?? 0) else { throw bad("stack underflow at byte \(p)") }
            return value
        }
        func popMark() throws -> [PickleValue] {
            guard let mark = marks.popLast(), mark <= stack.count else { throw bad("missing MARK at byte \(p)") }
            let items = Array(stack[mark...])
            stack.removeSubrange(mark...)
            return items
        }
        func top() throws -> PickleValue {
            guard let value = stack.last, stack.count > (marks.last ?? 0) else { throw bad("stack underflow at byte \(p)") }
            return value
        }
        func global(_ module: String, _ name: String) throws -> PickleValue {
            let full = module + "." + name
            guard permittedPickleGlobals.contains(full) else {
                throw bad("refusing global '\(full)': a state dict references only tensors, storages and OrderedDict")
            }
            return .global(full)
        }
        func setItems(_ items: [PickleValue], into target: PickleValue) throws {
            guard case .dict(let dict) = target else { throw bad("SETITEM(S) on a \(target.kind)") }
            guard items.count % 2 == 0 else { throw bad("SETITEMS with an odd number of items") }
            for i in stride(from: 0, to: items.count, by: 2) { dict.items.append((items[i], items[i + 1])) }
        }

        while true {
            let opcodePosition = p
            let opcode = try u8()
            switch opcode {
            case 0x80: _ = try u8()                                              // PROTO
            case 0x95: _ = try le(UInt64.self)                                   // FRAME
            case 0x2E:                                                           // STOP
                guard stack.count == 1, marks.isEmpty else { throw bad("STOP with \(stack.count) values on the stack") }
                return stack[0]
            case 0x28: marks.append(stack.count)                                 // MARK
            case 0x7D: stack.append(.dict(PickleDict()))                         // EMPTY_DICT
            case 0x5D: stack.append(.list(PickleList()))                         // EMPTY_LIST
            case 0x29: stack.append(.tuple([]))                                  // EMPTY_TUPLE
            case 0x4E: stack.append(.none)                                       // NONE
            case 0x88: stack.append(.bool(true))                                 // NEWTRUE
            case 0x89: stack.append(.bool(false))                                // NEWFALSE
            case 0x4B: stack.append(.int(try u8()))                              // BININT1
            case 0x4D: stack.append(.int(Int(try le(UInt16.self))))              // BININT2
            case 0x4A: stack.append(.int(Int(try le(Int32.self))))               // BININT
            case 0x8A:                                                           // LONG1
                let n = try u8()
                guard n <= 8 else { throw bad("integer of \(n) bytes at byte \(opcodePosition)") }
                try need(n)
                var value: Int = 0
                for i in 0..<n { value |= Int(bytes[p + i]) << (8 * i) }
                if n > 0 && n < 8 && bytes[p + n - 1] & 0x80 != 0 { value -= 1 << (8 * n) }  // sign-extend
                p += n
                stack.append(.int(value))
            case 0x47:                                                           // BINFLOAT (big-endian)
                let bits = UInt64(bigEndian: try le(UInt64.self).littleEndian)
                stack.append(.float(Double(bitPattern: bits)))
            case 0x58: stack.append(.string(try utf8(Int(try le(UInt32.self)))))      // BINUNICODE
            case 0x8C: stack.append(.string(try utf8(try u8())))                       // SHORT_BINUNICODE
            case 0x8D:                                                                 // BINUNICODE8
                let n = try le(UInt64.self)
                guard n <= UInt64(bytes.count) else { throw bad("truncated at byte \(p)") }
                stack.append(.string(try utf8(Int(n))))
            case 0x74: stack.append(.tuple(try popMark()))                       // TUPLE
            case 0x85: let a = try pop(); stack.append(.tuple([a]))              // TUPLE1
            case 0x86: let b = try pop(), a = try pop(); stack.append(.tuple([a, b]))                    // TUPLE2
            case 0x87: let c = try pop(), b = try pop(), a = try pop(); stack.append(.tuple([a, b, c]))  // TUPLE3
            case 0x71: memo[try u8()] = try top()                                // BINPUT
            case 0x72: memo[Int(try le(UInt32.self))] = try top()                // LONG_BINPUT
            case 0x94: memo[memo.count] = try top()                              // MEMOIZE
            case 0x68, 0x6A:                                                     // BINGET, LONG_BINGET
                let index = opcode == 0x68 ? try u8() : Int(try le(UInt32.self))
                guard let value = memo[index] else { throw bad("memo \(index) read before it is written") }
                stack.append(value)
            case 0x30: _ = try pop()                                             // POP
            case 0x63:                                                           // GLOBAL
                let module = try line(), name = try line()
                stack.append(try global(module, name))
            case 0x93:                                                           // STACK_GLOBAL
                let name = try pop(), module = try pop()
                guard case .string(let n) = name, case .string(let m) = module else { throw bad("STACK_GLOBAL needs two strings") }
                stack.append(try global(m, n))
            case 0x73:                                                           // SETITEM
                let value = try pop(), key = try pop()
                try setItems([key, value], into: try top())
            case 0x75:                                                           // SETITEMS
                let items = try popMark()
                try setItems(items, into: try top())
            case 0x61:                                                           // APPEND
                let value = try pop()
                guard case .list(let list) = try top() else { throw bad("APPEND on a non-list") }
                list.items.append(value)
            case 0x65:                                                           // APPENDS
                let items = try popMark()
                guard case .list(let list) = try top() else { throw bad("APPENDS on a non-list") }
                list.items.append(contentsOf: items)
            case 0x51:                                                           // BINPERSID
                stack.append(try persistentLoad(try pop()))
            case 0x52:                                                           // REDUCE
                let arguments = try pop(), callable = try pop()
                guard case .tuple(let args) = arguments else { throw bad("REDUCE arguments are a \(arguments.kind)") }
                stack.append(try reduce(callable, args))
            case 0x62:                                                           // BUILD
                // Only OrderedDict's instance state (a state dict's `_metadata`) is expected; it is dropped.
                let state = try pop()
                let target = try top()
                guard case .dict = target else { throw bad("BUILD on a \(target.kind)") }
                guard case .dict = state else { throw bad("BUILD with a \(state.kind) state") }
            default:
                throw bad(String(format: "unsupported pickle opcode 0x%02x at byte %d", opcode, opcodePosition))
            }
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)` → the storage.
    private func persistentLoad(_ pid: PickleValue) throws -> PickleValue {
        guard case .tuple(let fields) = pid, fields.count == 5,
              case .string("storage") = fields[0], case .global(let typeName) = fields[1],
              case .string(let key) = fields[2], case .int(let count) = fields[4], count >= 0 else {
            throw bad("persistent id is not ('storage', type, key, location, numel)")
        }
        guard let type = TorchStorageType.known[typeName] else { throw bad("'\(typeName)' is not a storage type") }
        return .storage(try storage(type, key, count))
    }

    private func reduce(_ callable: PickleValue, _ args: [PickleValue]) throws -> PickleValue {
        guard case .global(let name) = callable else { throw bad("REDUCE on a \(callable.kind)") }
        switch name {
        case "collections.OrderedDict":
            guard args.isEmpty else { throw bad("OrderedDict called with arguments") }
            return .dict(PickleDict())
        case "torch._utils._rebuild_tensor_v2":
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            guard args.count >= 4, case .storage(let storage) = args[0], case .int(let offset) = args[1],
                  case .tuple(let sizeValues) = args[2], case .tuple(let strideValues) = args[3] else {
                throw bad("unexpected arguments to _rebuild_tensor_v2")
            }
            let shape = try sizeValues.map { value -> Int in
                guard case .int(let v) = value, v >= 0 else { throw bad("tensor size is not a non-negative int") }
                return v
            }
            let stride = try strideValues.map { value -> Int in
                guard case .int(let v) = value, v >= 0 else { throw bad("tensor stride is not a non-negative int") }
                return v
            }
            guard shape.count == stride.count, offset >= 0 else { throw bad("tensor size \(shape) and stride \(stride) disagree") }
            return .tensor(TorchTensor(storage: storage, offset: offset, shape: shape, stride: stride))
        case "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state":
            guard let first = args.first, case .tensor = first else { throw bad("unexpected arguments to \(name)") }
            return first
        default:
            throw bad("'\(name)' cannot be called")
        }
    }
}

/// A `pytorch_model.bin` written by `torch.save(state_dict)`: the zip archive is memory-mapped, the
/// pickle read with the restricted unpickler, and every tensor checked against its storage on open.
public final class TorchCheckpointFile: TensorSource, @unchecked Sendable {
    public let path: String
    let archive: ZipArchive
    let tensors: [String: TorchTensor]
    /// Storage key → bytes of `<prefix>/data/<key>`.
    let storages: [String: UnsafeRawBufferPointer]

    public convenience init(url: URL) throws {
        try self.init(path: url.path)
    }

    public init(path: String) throws {
        self.path = path
        func bad(_ reason: String) -> CheckpointError { .unreadable(file: path, reason: reason) }
        archive = try ZipArchive(file: MappedFile(path: path))

        // The one top-level folder holding data.pkl.
        let pickles = archive.names.filter { name in
            name.hasSuffix("/data.pkl") && name.dropLast("/data.pkl".count).firstIndex(of: "/") == nil
        }
        guard pickles.count == 1 else {
            throw bad(pickles.isEmpty ? "no <folder>/data.pkl in the archive (not a torch.save file)"
                                      : "several data.pkl entries: \(pickles)")
        }
        let prefix = String(pickles[0].dropLast("data.pkl".count))
        if archive.entries[prefix + "byteorder"] != nil {
            let order = String(decoding: try archive.data(prefix + "byteorder"), as: UTF8.self)
            guard order == "little" else { throw bad("byte order '\(order)' is not supported") }
        }

        var storages: [String: UnsafeRawBufferPointer] = [:]
        let archive = self.archive
        let unpickler = RestrictedUnpickler(bytes: try archive.data(pickles[0]), file: path) { type, key, count in
            let entry = prefix + "data/" + key
            guard archive.entries[entry] != nil else { throw bad("storage '\(key)' has no entry '\(entry)'") }
            let data = try archive.data(entry)
            let (needed, overflow) = count.multipliedReportingOverflow(by: type.elementSize)
            guard !overflow, data.count >= needed else {
                throw bad("storage '\(key)' holds \(data.count) bytes, too few for \(count) elements of \(type.name)")
            }
            storages[key] = data
            return TorchStorage(type: type, key: key, count: count)
        }
        let root = try unpickler.load()
        guard case .dict(let dict) = root else { throw bad("data.pkl holds a \(root.kind), not a state dict") }

        var tensors: [String: TorchTensor] = [:]
        for (key, value) in dict.items {
            guard case .string(let name) = key else { throw bad("state dict key is a \(key.kind), not a string") }
            guard case .tensor(let tensor) = value else { throw bad("state dict entry '\(name)' is a \(value.kind), not a tensor") }
            // The last element the view touches must lie inside its storage, and the element count
            // must be allocatable (a stride-0 view could claim any size).
            var elements = 1
            for size in tensor.shape {
                let (product, overflow) = elements.multipliedReportingOverflow(by: size)
                guard !overflow, product <= 1 << 36 else { throw bad("tensor '\(name)' size \(tensor.shape) is too large") }
                elements = product
            }
            if elements > 0 {
                var last = tensor.offset
                for (size, step) in zip(tensor.shape, tensor.stride) {
                    let (reach, overflow1) = (size - 1).multipliedReportingOverflow(by: step)
                    let (sum, overflow2) = last.addingReportingOverflow(reach)
                    guard !overflow1, !overflow2 else { throw bad("tensor '\(name)' stride \(tensor.stride) overflows") }
                    last = sum
                }
                guard last < tensor.storage.count else {
                    throw bad("tensor '\(name)' (offset \(tensor.offset), size \(tensor.shape), stride \(tensor.stride)) reaches element \(last) of a storage of \(tensor.storage.count)")
                }
            }
            tensors[name] = tensor
        }
        self.tensors = tensors
        self.storages = storages
    }

    public var tensorNames: [String] { Array(tensors.keys) }

    public func shape(of name: String) -> [Int]? { tensors[name]?.shape }

    /// The storage type of `name` ("torch.FloatStorage", "torch.HalfStorage", ...), nil when absent.
    public func dtype(of name: String) -> String? { tensors[name]?.storage.type.name }

    public func floats(_ name: String) throws -> [Float] {
        guard let tensor = tensors[name] else { throw CheckpointError.missingTensor(name) }
        guard let encoding = tensor.storage.type.encoding else {
            throw CheckpointError.unsupportedDType(name: name, dtype: tensor.storage.type.name)
        }
        let storage = storages[tensor.storage.key]!
        let size = encoding.byteCount
        let count = tensor.shape.reduce(1, *)
        let rank = tensor.shape.count
        var contiguous = true
        var expected = 1
        for d in stride(from: rank - 1, through: 0, by: -1) where tensor.shape[d] != 1 {
            if tensor.stride[d] != expected { contiguous = false }
            expected *= tensor.shape[d]
        }
        defer {
            if let start = storage.baseAddress, let mapStart = archive.file.base {
                let offset = start - mapStart
                archive.file.dropPages(offset ..< offset + storage.count)
            }
        }
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            defer { initialized = count }
            guard count > 0 else { return }
            let base = storage.baseAddress!   // non-empty: init checked the view lies inside the storage
            let out = buffer.baseAddress!
            if contiguous {
                decodeFloats(encoding, from: base + tensor.offset * size, count: count, into: out)
                return
            }
            // Strided gather: walk the row-major index, innermost dimension in a tight loop.
            let inner = tensor.shape[rank - 1], innerStride = tensor.stride[rank - 1]
            var index = [Int](repeating: 0, count: rank)
            var written = 0
            while written < count {
                var element = tensor.offset
                for d in 0 ..< rank - 1 { element += index[d] * tensor.stride[d] }
                for i in 0 ..< inner {
                    decodeFloats(encoding, from: base + (element + i * innerStride) * size, count: 1, into: out + written + i)
                }
                written += inner
                var d = rank - 2
                while d >= 0 {
                    index[d] += 1
                    if index[d] < tensor.shape[d] { break }
                    index[d] = 0
                    d -= 1
                }
            }
        }
    }
}
