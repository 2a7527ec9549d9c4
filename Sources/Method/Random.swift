// Seeded randomness for the method. Every random choice is derived from (job seed, purpose, epoch), so a
// resumed job draws exactly what an uninterrupted one would, with no generator state to save.

/// SplitMix64: a 64-bit state, a fixed increment, a strong output mix.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    public private(set) var state: UInt64

    public init(seed: UInt64) { state = seed }

    /// A generator for one purpose of one job (`stream` distinguishes uses, e.g. "alignment shuffle"
    /// epoch 3 from "prompt shuffle" epoch 3).
    public init(seed: UInt64, stream: String, index: Int = 0) {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325 // FNV-1a of the stream name
        for byte in stream.utf8 { h = (h ^ UInt64(byte)) &* 0x100_0000_01b3 }
        var mixer = SeededRandom(seed: seed ^ h)
        state = mixer.next() ^ (UInt64(truncatingIfNeeded: index) &* 0x9e37_79b9_7f4a_7c15)
        _ = next()
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    /// Uniform in [low, high), 24 random bits.
    public mutating func uniform(_ low: Float, _ high: Float) -> Float {
        let unit = Float(next() >> 40) * 0x1p-24
        return low + (high - low) * unit
    }

    /// A random permutation of 0..<n (Fisher–Yates).
    public mutating func permutation(_ n: Int) -> [Int] {
        var p = Array(0..<n)
        if n < 2 { return p }
        for i in stride(from: n - 1, to: 0, by: -1) {
            let j = Int(next() % UInt64(i + 1))
            p.swapAt(i, j)
        }
        return p
    }
}
