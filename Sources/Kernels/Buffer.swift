import COpenBLAS
import Foundation

/// A contiguous, owned Float32 buffer: the storage of weights, activations and gradients.
/// Weights are written once while loading and then only read; activations belong to one run.
public final class Buffer: @unchecked Sendable {
    public let count: Int
    public let data: UnsafeMutablePointer<Float>

    /// A zero-filled buffer of `count` floats.
    public init(count: Int) {
        precondition(count >= 0)
        self.count = count
        data = .allocate(capacity: max(count, 1))
        let data = data, n = max(count, 1)
        // Large buffers are new memory: the zero fill is mostly the kernel's page faults, so it is shared out
        // over the caller's threads (in fixed pieces of 1 MiB) instead of holding them all behind one.
        profiled(.copy) {
            if n >= Self.parallelZeroFloats {
                let piece = Self.zeroPieceFloats
                parallelFor((n + piece - 1) / piece) { pieces in
                    let from = pieces.lowerBound * piece, to = min(n, pieces.upperBound * piece)
                    (data + from).initialize(repeating: 0, count: to - from)
                }
            } else {
                data.initialize(repeating: 0, count: n)
            }
        }
    }

    /// A buffer of `count` floats left uninitialised, for outputs a kernel writes whole before anything reads
    /// them (no zero-filling pass). Never pass one as an accumulated (`+=`) output.
    public init(uninitializedCount count: Int) {
        precondition(count >= 0)
        self.count = count
        data = .allocate(capacity: max(count, 1))
    }

    public convenience init(_ values: [Float]) {
        self.init(count: values.count)
        values.withUnsafeBufferPointer { data.update(from: $0.baseAddress!, count: values.count) }
    }

    deinit { data.deallocate() }

    /// Buffers of at least this many floats (4 MiB) are zeroed on the caller's threads, 1 MiB a piece.
    static let parallelZeroFloats = 1 << 20
    static let zeroPieceFloats = 1 << 18

    public var array: [Float] { Array(UnsafeBufferPointer(start: data, count: count)) }
    public func zero() { profiled(.copy) { data.update(repeating: 0, count: count) } }
}

// SIMD helpers: unaligned 8-wide loads and stores.
@inline(__always) func load8(_ p: UnsafePointer<Float>) -> SIMD8<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
}
@inline(__always) func load8(_ p: UnsafeMutablePointer<Float>) -> SIMD8<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
}
@inline(__always) func store8(_ p: UnsafeMutablePointer<Float>, _ v: SIMD8<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self)
}

/// dst[0..<count] = src[0..<count], timed as `KernelOp.copy` when a profile collects.
@inline(__always)
public func copyFloats(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, count: Int) {
    profiled(.copy) { dst.update(from: src, count: count) }
}

/// dst[0..<count] = 0, timed as `KernelOp.copy` when a profile collects.
@inline(__always)
public func zeroFloats(_ dst: UnsafeMutablePointer<Float>, count: Int) {
    profiled(.copy) { dst.update(repeating: 0, count: count) }
}
