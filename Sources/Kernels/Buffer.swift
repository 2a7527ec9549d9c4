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
        data.initialize(repeating: 0, count: max(count, 1))
    }

    public convenience init(_ values: [Float]) {
        self.init(count: values.count)
        values.withUnsafeBufferPointer { data.update(from: $0.baseAddress!, count: values.count) }
    }

    deinit { data.deallocate() }

    public var array: [Float] { Array(UnsafeBufferPointer(start: data, count: count)) }
    public func zero() { data.update(repeating: 0, count: count) }
}

/// Threads used by our own elementwise/attention loops (OpenBLAS has its own count, see `setThreads`).
nonisolated(unsafe) public private(set) var kernelThreads = 1

/// Sets the threads of our parallel loops and of OpenBLAS together.
public func setThreads(_ n: Int) {
    precondition(n >= 1)
    kernelThreads = n
    openblas_set_num_threads(Int32(n))
}

/// Runs `body` over `0..<n` split into at most `kernelThreads` contiguous chunks,
/// in parallel when each chunk holds at least `grain` items.
@inline(__always)
public func parallelFor(_ n: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
    let chunks = min(kernelThreads, n / max(grain, 1))
    if chunks <= 1 { if n > 0 { body(0..<n) }; return }
    DispatchQueue.concurrentPerform(iterations: chunks) { c in
        body((n * c / chunks)..<(n * (c + 1) / chunks))
    }
}

/// Splits a batch of `b` items into `kernelThreads` parts run at the same time, each single-threaded
/// (OpenBLAS and our loops): for batched inference this scales better than threading every GEMM.
public func batchParallel(_ b: Int, _ body: (Range<Int>) -> Void) {
    let chunks = min(kernelThreads, b)
    if chunks <= 1 { if b > 0 { body(0..<b) }; return }
    let saved = kernelThreads, blas = openblas_get_num_threads()
    kernelThreads = 1
    openblas_set_num_threads(1)
    defer { kernelThreads = saved; openblas_set_num_threads(blas) }
    DispatchQueue.concurrentPerform(iterations: chunks) { c in body((b * c / chunks)..<(b * (c + 1) / chunks)) }
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
