import Foundation
import Synchronization

// Where the time of a network pass goes (`nolad bench`'s breakdown). The timers are compiled in always and
// are off unless a caller runs code inside `KernelProfile.collect`: then every kernel and every marked
// copy adds its time, calls and GEMM FLOPs to that profile (only that one: the profile is bound to the
// calling thread like `withThreads`, so a job running beside the bench records nothing). Off, a timer
// costs one load and one branch.

/// What a timed piece of work is, as printed in the breakdown.
public enum KernelOp: Int, CaseIterable, Sendable {
    case gemm           // the linear layers' GEMMs (and any sgemm called outside another timed op)
    case bias           // bias broadcast before a GEMM, bias gradient
    case attention      // softmax(q·kᵀ)·v per head: its small GEMMs and softmax (`AttentionPart`)
    case layerNorm
    case activation     // GELU / QuickGELU (with the fc1 bias folded in, forward)
    case softmax        // softmax outside attention
    case residual       // residual adds, layer scale
    case copy           // copies and zeroing: buffers, concatenation, gradient scatter, zero-filled allocation
    case patches        // im2col of the patch embedding
    case loss           // L2 normalisation of features, the loss
    case augmentation   // strong views: crop, flip, jitter, perspective, blur, normalise
    case convolution    // depthwise convolutions and their input gradient, im2col of dense ones (MCi towers)

    public var label: String {
        switch self {
        case .gemm: "GEMM (linear layers)"
        case .bias: "bias"
        case .attention: "attention"
        case .layerNorm: "LayerNorm"
        case .activation: "GELU"
        case .softmax: "softmax"
        case .residual: "residual, layer scale"
        case .copy: "copies and zeroing"
        case .patches: "im2col (patches)"
        case .loss: "L2 norm, loss"
        case .augmentation: "augmentation (strong views)"
        case .convolution: "convolution (depthwise, im2col)"
        }
    }
    public var key: String {
        switch self {
        case .gemm: "gemm"
        case .bias: "bias"
        case .attention: "attention"
        case .layerNorm: "layer_norm"
        case .activation: "gelu"
        case .softmax: "softmax"
        case .residual: "residual"
        case .copy: "copy_zero"
        case .patches: "im2col"
        case .loss: "loss"
        case .augmentation: "augmentation"
        case .convolution: "convolution"
        }
    }
}

public enum KernelPhase: Int, CaseIterable, Sendable {
    case forward, backward
    public var key: String { self == .forward ? "forward" : "backward" }
}

/// The parts of `KernelOp.attention`, timed inside it (their sum is at most the op's time; the rest is
/// the per-head loop's imbalance and overhead).
public enum AttentionPart: Int, CaseIterable, Sendable {
    case scoreGEMM      // forward q·kᵀ; backward dO·vᵀ
    case softmax        // forward softmax; backward p ⊙ (dp − Σ p·dp)
    case valueGEMM      // forward p·v; backward pᵀ·dO, ds·k, dsᵀ·q
    public var label: String {
        switch self {
        case .scoreGEMM: "score GEMMs (q·kᵀ | dO·vᵀ)"
        case .softmax: "softmax (| its backward)"
        case .valueGEMM: "value GEMMs (p·v | pᵀ·dO, ds·k, dsᵀ·q)"
        }
    }
    public var key: String { ["score_gemm", "softmax", "value_gemm"][rawValue] }
}

/// One GEMM shape as the `sgemm` wrapper was called with it (C (m,n) = op(A) (m,k) · op(B) (k,n)).
public struct GEMMShape: Hashable, Sendable, Comparable {
    public let m: Int, n: Int, k: Int
    public let transA: Bool, transB: Bool
    public init(m: Int, n: Int, k: Int, transA: Bool, transB: Bool) {
        self.m = m; self.n = n; self.k = k; self.transA = transA; self.transB = transB
    }
    /// 2·m·n·k: a multiply-add is two floating-point operations.
    public var flops: Int { 2 * m * n * k }
    public var description: String { "\(m)×\(n)×\(k)\(transA ? " Aᵀ" : "")\(transB ? " Bᵀ" : "")" }
    public static func < (a: Self, b: Self) -> Bool {
        (a.m, a.n, a.k, a.transA ? 1 : 0, a.transB ? 1 : 0) < (b.m, b.n, b.k, b.transA ? 1 : 0, b.transB ? 1 : 0)
    }
}

/// Times, calls and GEMM FLOPs per (operation, phase), collected while code runs inside `collect`.
/// Times are thread-seconds: the wall time of a timed call × the threads bound to its caller
/// (`KernelThreads.current`), so that a pass's entries add up to its wall time × its threads whether the
/// threads split one kernel or run sub-batches side by side.
public final class KernelProfile: @unchecked Sendable {
    public struct Entry: Sendable {
        public var threadSeconds: Double = 0
        public var calls = 0
        public var flops = 0
    }
    private let lock = NSLock()
    private var entries = [Entry](repeating: Entry(), count: KernelOp.allCases.count * KernelPhase.allCases.count)
    private var parts = [Double](repeating: 0, count: AttentionPart.allCases.count * KernelPhase.allCases.count)
    private var shapes: [GEMMShape: (calls: Int, flops: Int)] = [:]

    public init() {}

    /// Runs `body` with this profile collecting on this thread and every thread its kernels use.
    public func collect<R>(_ body: () throws -> R) rethrows -> R {
        Profiling.active.add(1, ordering: .relaxed)
        defer { Profiling.active.subtract(1, ordering: .relaxed) }
        return try Profiling.$context.withValue(ProfileContext(profile: self, inside: nil, phase: .forward), operation: body)
    }

    public func entry(_ op: KernelOp, _ phase: KernelPhase) -> Entry {
        lock.withLock { entries[op.rawValue * 2 + phase.rawValue] }
    }
    public func attentionPart(_ part: AttentionPart, _ phase: KernelPhase) -> Double {
        lock.withLock { parts[part.rawValue * 2 + phase.rawValue] }
    }
    /// Every GEMM shape the linear layers ran (`KernelOp.gemm`), with its calls and FLOPs.
    public var gemmShapes: [(shape: GEMMShape, calls: Int, flops: Int)] {
        lock.withLock { shapes.map { ($0.key, $0.value.calls, $0.value.flops) }.sorted { $0.shape < $1.shape } }
    }
    /// All FLOPs counted: every sgemm call, linear layers and attention alike.
    public var totalFlops: Int { lock.withLock { entries.reduce(0) { $0 + $1.flops } } }
    public var totalThreadSeconds: Double { lock.withLock { entries.reduce(0) { $0 + $1.threadSeconds } } }

    func add(_ op: KernelOp, _ phase: KernelPhase, threadSeconds: Double, calls: Int) {
        lock.withLock {
            entries[op.rawValue * 2 + phase.rawValue].threadSeconds += threadSeconds
            entries[op.rawValue * 2 + phase.rawValue].calls += calls
        }
    }
    func addFlops(_ op: KernelOp, _ phase: KernelPhase, _ shape: GEMMShape) {
        lock.withLock {
            entries[op.rawValue * 2 + phase.rawValue].flops += shape.flops
            if op == .gemm { shapes[shape, default: (0, 0)].calls += 1; shapes[shape, default: (0, 0)].flops += shape.flops }
        }
    }
    func addPart(_ part: AttentionPart, _ phase: KernelPhase, threadSeconds: Double) {
        lock.withLock { parts[part.rawValue * 2 + phase.rawValue] += threadSeconds }
    }
}

/// The profile a thread collects into, and the timed op it is inside (nested timers do not count again).
struct ProfileContext: Sendable {
    let profile: KernelProfile
    let inside: (op: KernelOp, phase: KernelPhase)?
    /// The phase of marked work that does not name its own (`profiled(.copy) { … }`).
    let phase: KernelPhase
}

enum Profiling {
    /// How many `collect` calls are running, in the whole process: 0 keeps every timer at one branch.
    static let active = Atomic<Int>(0)
    @TaskLocal static var context: ProfileContext?

    @inline(__always) static var on: Bool { active.load(ordering: .relaxed) != 0 }

    /// The caller's context, to hand to the threads of a parallel loop (nil when nothing collects).
    @inline(__always) static func capture() -> ProfileContext? { on ? context : nil }

    /// Runs `body` on a parallel loop's thread with the caller's context.
    @inline(__always) static func bind(_ context: ProfileContext?, _ body: () -> Void) {
        if let context { Profiling.$context.withValue(context, operation: body) } else { body() }
    }

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
}

/// Whether a `KernelProfile` is collecting on this thread.
public var kernelProfileActive: Bool { Profiling.on && Profiling.context != nil }

/// Runs `body` timed as `op` in `phase` (default: the phase of the enclosing `withProfilePhase`) when a
/// profile collects on this thread and no other timed op encloses this one; otherwise just runs it.
@inline(__always)
public func profiled<R>(_ op: KernelOp, _ phase: KernelPhase? = nil, _ body: () throws -> R) rethrows -> R {
    if !Profiling.on { return try body() }
    return try profiledSlow(op, phase, body)
}

@inline(never)
func profiledSlow<R>(_ op: KernelOp, _ phase: KernelPhase?, _ body: () throws -> R) rethrows -> R {
    guard let context = Profiling.context, context.inside == nil else { return try body() }
    let phase = phase ?? context.phase, threads = KernelThreads.current, start = Profiling.now()
    let result = try Profiling.$context.withValue(ProfileContext(profile: context.profile, inside: (op, phase), phase: phase), operation: body)
    context.profile.add(op, phase, threadSeconds: Double(Profiling.now() - start) / 1e9 * Double(threads), calls: 1)
    return result
}

/// Marks the work in `body` as the backward (or forward) pass for the timers that do not name a phase.
@inline(__always)
public func withProfilePhase<R>(_ phase: KernelPhase, _ body: () throws -> R) rethrows -> R {
    if !Profiling.on { return try body() }
    guard let context = Profiling.context else { return try body() }
    return try Profiling.$context.withValue(ProfileContext(profile: context.profile, inside: context.inside, phase: phase), operation: body)
}

/// Times one part of the attention op (inside its per-head loop).
@inline(__always)
func attentionPart(_ part: AttentionPart, _ body: () -> Void) {
    if !Profiling.on { body(); return }
    guard let context = Profiling.context, let inside = context.inside, inside.op == .attention else { body(); return }
    let threads = KernelThreads.current, start = Profiling.now()
    body()
    context.profile.addPart(part, inside.phase, threadSeconds: Double(Profiling.now() - start) / 1e9 * Double(threads))
}
