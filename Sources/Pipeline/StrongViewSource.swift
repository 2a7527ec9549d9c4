import Foundation
import Imaging
import Method

#if canImport(Glibc)
import Glibc
#endif

/// A job's strong views for prompt tuning: each unit's views are asked for when the unit is computed
/// (`views`), and the owner says which unit comes next (`ahead`), so those views are computed in the
/// meantime on one thread of idle priority. A view depends only on (job seed, epoch, image), so a view
/// computed ahead is the view the unit would have computed.
///
/// The thread runs under Linux's SCHED_IDLE policy: it gets a core only when the job's kernels leave one
/// idle (between the small GEMMs of a tiny model, in the serial parts of a step, while the owner talks to
/// the database), and never takes a core from them, so it cannot slow a step down. What it has not
/// finished when the unit is computed, the job's threads compute as before. With ViT-B the kernels keep
/// every core busy and the views are about 2 % of a unit; with the demo's tiny models they were 44 %
/// (docs/benchmarks.md).
public final class StrongViewSource: @unchecked Sendable {
    let decoded: DecodedImages
    let seed: UInt64
    let config: StrongViewConfig
    let mean: [Float], std: [Float]
    /// Floats in one view (3 · size · size).
    var slot: Int { 3 * config.size * config.size }

    private let condition = NSCondition()
    /// The unit asked for ahead: its images, their views as they are done, and how many the thread took.
    private struct Ahead {
        let epoch: Int
        let indices: [Int]
        var views: [[Float]?]
        var taken = 0
        var running = 0
        let generation: Int
    }
    private var ahead: Ahead?
    private var generation = 0
    private var closed = false
    private var started = false
    /// Views of the units asked for that were computed ahead (figures for the stage's metrics event).
    public private(set) var viewsAhead = 0
    public private(set) var viewsAsked = 0

    /// Whether the thread lowers itself to SCHED_IDLE (tests turn it off to see the thread's work on a
    /// busy machine); the policy it then runs under, once started.
    let idlePriority: Bool
    private(set) var aheadPolicy: Int32?

    public init(decoded: DecodedImages, seed: UInt64, config: StrongViewConfig, mean: [Float], std: [Float], idlePriority: Bool = true) {
        self.idlePriority = idlePriority
        self.decoded = decoded
        self.seed = seed
        self.config = config
        self.mean = mean
        self.std = std
    }

    /// One view (3, size, size), normalised.
    func view(_ image: Int, epoch: Int) throws -> [Float] {
        var rng = AugmentRNG(seed: strongViewSeed(jobSeed: seed, epoch: epoch, image: image))
        return strongView(try decoded.image(image), config: config, rng: &rng, mean: mean, std: std)
    }

    /// Starts computing the views of `indices` in `epoch` ahead (replacing any unit asked for before
    /// that has not been taken); the thread starts with the first call.
    public func ahead(_ indices: [Int], epoch: Int) {
        condition.lock()
        defer { condition.unlock() }
        if closed { return }
        if let a = ahead, a.epoch == epoch, a.indices == indices { return }
        generation += 1
        ahead = Ahead(epoch: epoch, indices: indices, views: Array(repeating: nil, count: indices.count), generation: generation)
        if !started {
            started = true
            let thread = Thread { [self] in aheadLoop() }
            thread.name = "strong-views-ahead"
            thread.start()
        }
        condition.broadcast()
    }

    /// The views of `indices` in `epoch`, (B, 3, size, size): those computed ahead, the rest on the job's
    /// threads (`decoded.threads`) now.
    public func views(_ indices: [Int], epoch: Int) throws -> [Float] {
        let slot = self.slot
        var out = [Float](repeating: 0, count: indices.count * slot)
        // Positions this call computes; the others were taken by the thread (done or running).
        var mine = Array(indices.indices)
        var generationTaken: Int?
        condition.lock()
        if let a = ahead, a.epoch == epoch, a.indices == indices {
            mine = Array(a.taken..<indices.count)
            ahead!.taken = indices.count
            generationTaken = a.generation
        }
        condition.unlock()
        var failure: String?
        let lock = NSLock()
        out.withUnsafeMutableBufferPointer { buffer in
            let base = buffer.baseAddress!
            func compute(_ positions: ArraySlice<Int>) {
                for j in positions {
                    do {
                        let v = try view(indices[j], epoch: epoch)
                        v.withUnsafeBufferPointer { (base + j * slot).update(from: $0.baseAddress!, count: slot) }
                    } catch {
                        lock.withLock { failure = "\(error)" }
                    }
                }
            }
            // The job's threads, not every core: a view depends only on its image's seed.
            let parts = min(decoded.threads, mine.count)
            if parts > 1 {
                DispatchQueue.concurrentPerform(iterations: parts) { part in
                    compute(mine[(mine.count * part / parts)..<(mine.count * (part + 1) / parts)])
                }
            } else {
                compute(mine[...])
            }
            guard let generationTaken else { return }
            // The thread's views: wait for the one it may be computing, then copy them in (one it
            // could not compute is computed here, so its error is this call's).
            condition.lock()
            while ahead?.generation == generationTaken && ahead!.running > 0 { condition.wait() }
            let done = ahead?.generation == generationTaken ? ahead!.views : []
            if ahead?.generation == generationTaken { ahead = nil }
            condition.unlock()
            var missing: [Int] = []
            for j in 0..<(indices.count - mine.count) {
                if j < done.count, let v = done[j] {
                    v.withUnsafeBufferPointer { (base + j * slot).update(from: $0.baseAddress!, count: slot) }
                } else {
                    missing.append(j)
                }
            }
            compute(missing[...])
            viewsAhead += indices.count - mine.count - missing.count
        }
        viewsAsked += indices.count
        if let failure { throw JobError.transient("an image became unreadable during prompt tuning: \(failure)") }
        return out
    }

    /// Ends the thread (after the view it is computing); later `ahead` calls do nothing.
    public func close() {
        condition.lock()
        closed = true
        ahead = nil
        condition.broadcast()
        condition.unlock()
    }

    /// Waits until the unit asked for ahead has every view done (tests); false after `timeout` seconds.
    func waitForAhead(timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock()
        defer { condition.unlock() }
        while let a = ahead, a.taken < a.indices.count || a.running > 0 {
            if !condition.wait(until: deadline) { return false }
        }
        return ahead != nil
    }

    private func aheadLoop() {
        let policy = idlePriority ? lowerToIdlePriority() : nil
        condition.lock()
        aheadPolicy = policy ?? Int32(sched_getscheduler(0))
        while !closed {
            guard let a = ahead, a.taken < a.indices.count else {
                condition.wait()
                continue
            }
            let j = a.taken
            ahead!.taken += 1
            ahead!.running += 1
            condition.unlock()
            let v = try? view(a.indices[j], epoch: a.epoch)
            condition.lock()
            if ahead?.generation == a.generation {
                ahead!.views[j] = v
                ahead!.running -= 1
            }
            condition.broadcast()
        }
        condition.unlock()
    }
}

/// Linux's SCHED_IDLE for the calling thread: it runs only when a core would otherwise be idle. Any
/// thread may lower itself to it; where that fails, it stays at its normal priority, which only costs
/// the job's kernels a share of a core while it computes.
/// Returns the policy the thread runs under afterwards.
private func lowerToIdlePriority() -> Int32 {
    var parameter = sched_param()
    parameter.sched_priority = 0
    _ = pthread_setschedparam(pthread_self(), schedIdle, &parameter)
    return Int32(sched_getscheduler(0))
}

/// SCHED_IDLE in Linux's uapi sched.h (Glibc's module does not export the name).
let schedIdle: Int32 = 5
