import Foundation

/// The sampler's random numbers: xoshiro256** seeded through SplitMix64. This is our own generator, so
/// the strong-view parameters are distributed as torchvision draws them (same distributions, same order
/// of draws) but are not the same numbers torch's generator would give for a seed.
public struct AugmentRNG: Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }

    /// Uniform in [0, 1) with 53 random bits.
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Uniform in [low, high).
    public mutating func uniform(_ low: Double, _ high: Double) -> Double { low + (high - low) * uniform() }

    /// Uniform integer in [low, high) (torch.randint's range), without modulo bias.
    public mutating func int(_ low: Int, _ high: Int) -> Int {
        precondition(high > low, "AugmentRNG.int: empty range \(low)..<\(high)")
        let n = UInt64(high - low)
        let limit = UInt64.max - UInt64.max % n
        var v = next()
        while v >= limit { v = next() }
        return low + Int(v % n)
    }

    /// A uniformly random permutation of 0..<n (torch.randperm).
    public mutating func permutation(_ n: Int) -> [Int] {
        var p = Array(0..<n)
        for i in stride(from: n - 1, to: 0, by: -1) { p.swapAt(i, int(0, i + 1)) }
        return p
    }
}

/// ColorJitter's ranges as torchvision stores them: factors drawn uniformly from these closed intervals.
public struct ColorJitterRanges: Sendable, Equatable {
    public var brightness: ClosedRange<Double>
    public var contrast: ClosedRange<Double>
    public var saturation: ClosedRange<Double>
    public var hue: ClosedRange<Double>

    /// torchvision's ColorJitter(b, c, s, h): [max(0, 1 - x), 1 + x] and [-h, h].
    public init(brightness: Double, contrast: Double, saturation: Double, hue: Double) {
        self.brightness = max(0, 1 - brightness)...(1 + brightness)
        self.contrast = max(0, 1 - contrast)...(1 + contrast)
        self.saturation = max(0, 1 - saturation)...(1 + saturation)
        self.hue = -hue...hue
    }
}

/// NoLA's strong view (DESIGN.md step 3) as a list of torchvision transforms with their probabilities.
public struct StrongViewConfig: Sendable, Equatable {
    public var size = 224
    public var scale: ClosedRange<Double> = 0.2...1.0
    public var ratio: ClosedRange<Double> = (3.0 / 4.0)...(4.0 / 3.0)
    public var flipProbability = 0.5
    public var jitter = ColorJitterRanges(brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1)
    public var jitterProbability = 0.8
    public var perspectiveDistortion = 0.2
    public var perspectiveProbability = 0.5
    /// The second ColorJitter after the perspective (always applied when set).
    public var secondJitter: ColorJitterRanges? = ColorJitterRanges(brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1)
    /// GaussianBlur radius (Pillow's σ) drawn uniformly from this range.
    public var blurRadius: ClosedRange<Double> = 0.1...2.0
    public var blurProbability = 1.0

    public init() {}
}

public struct ColorJitterParameters: Sendable, Equatable {
    /// torchvision's fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    public var order: [Int]
    public var brightness: Double
    public var contrast: Double
    public var saturation: Double
    public var hue: Double

    public init(order: [Int], brightness: Double, contrast: Double, saturation: Double, hue: Double) {
        precondition(order.sorted() == [0, 1, 2, 3], "ColorJitterParameters: order must be a permutation of 0...3")
        self.order = order
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
    }
}

/// Every random choice of one strong view; applying them is deterministic.
public struct StrongViewParameters: Sendable, Equatable {
    public var cropTop: Int, cropLeft: Int, cropHeight: Int, cropWidth: Int
    public var flip: Bool
    public var jitter: ColorJitterParameters?
    /// Perspective coefficients (torchvision's float32 solution), nil when not applied.
    public var perspective: [Float]?
    public var secondJitter: ColorJitterParameters?
    public var blurRadius: Double?

    public init(cropTop: Int, cropLeft: Int, cropHeight: Int, cropWidth: Int, flip: Bool, jitter: ColorJitterParameters?,
                perspective: [Float]?, secondJitter: ColorJitterParameters?, blurRadius: Double?) {
        self.cropTop = cropTop
        self.cropLeft = cropLeft
        self.cropHeight = cropHeight
        self.cropWidth = cropWidth
        self.flip = flip
        self.jitter = jitter
        self.perspective = perspective
        self.secondJitter = secondJitter
        self.blurRadius = blurRadius
    }
}

/// torchvision RandomResizedCrop.get_params.
func sampleResizedCrop(width: Int, height: Int, scale: ClosedRange<Double>, ratio: ClosedRange<Double>,
                       rng: inout AugmentRNG) -> (top: Int, left: Int, height: Int, width: Int) {
    let area = Double(height * width)
    let logRatio = (log(ratio.lowerBound), log(ratio.upperBound))
    for _ in 0..<10 {
        let targetArea = area * rng.uniform(scale.lowerBound, scale.upperBound)
        let aspect = exp(rng.uniform(logRatio.0, logRatio.1))
        let w = Int((targetArea * aspect).squareRoot().rounded(.toNearestOrEven))
        let h = Int((targetArea / aspect).squareRoot().rounded(.toNearestOrEven))
        if w > 0 && w <= width && h > 0 && h <= height {
            let i = rng.int(0, height - h + 1)
            let j = rng.int(0, width - w + 1)
            return (i, j, h, w)
        }
    }
    // Fallback: central crop.
    let inRatio = Double(width) / Double(height)
    var w = width, h = height
    if inRatio < ratio.lowerBound {
        h = Int((Double(w) / ratio.lowerBound).rounded(.toNearestOrEven))
    } else if inRatio > ratio.upperBound {
        w = Int((Double(h) * ratio.upperBound).rounded(.toNearestOrEven))
    }
    return ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision ColorJitter.get_params.
func sampleColorJitter(_ ranges: ColorJitterRanges, rng: inout AugmentRNG) -> ColorJitterParameters {
    let order = rng.permutation(4)
    let b = rng.uniform(ranges.brightness.lowerBound, ranges.brightness.upperBound)
    let c = rng.uniform(ranges.contrast.lowerBound, ranges.contrast.upperBound)
    let s = rng.uniform(ranges.saturation.lowerBound, ranges.saturation.upperBound)
    let h = rng.uniform(ranges.hue.lowerBound, ranges.hue.upperBound)
    return ColorJitterParameters(order: order, brightness: b, contrast: c, saturation: s, hue: h)
}

/// torchvision RandomPerspective.get_params: corners moved inwards by up to distortion · half size.
func samplePerspective(width: Int, height: Int, distortion: Double, rng: inout AugmentRNG) -> [Float] {
    let dw = Int(distortion * Double(width / 2)), dh = Int(distortion * Double(height / 2))
    let topLeft = (rng.int(0, dw + 1), rng.int(0, dh + 1))
    let topRight = (rng.int(width - dw - 1, width), rng.int(0, dh + 1))
    let bottomRight = (rng.int(width - dw - 1, width), rng.int(height - dh - 1, height))
    let bottomLeft = (rng.int(0, dw + 1), rng.int(height - dh - 1, height))
    let start = [(0, 0), (width - 1, 0), (width - 1, height - 1), (0, height - 1)]
    return perspectiveCoefficients(start: start, end: [topLeft, topRight, bottomRight, bottomLeft])
}

/// Draws one strong view's parameters in torchvision's order of draws.
public func sampleStrongView(width: Int, height: Int, config: StrongViewConfig = StrongViewConfig(),
                             rng: inout AugmentRNG) -> StrongViewParameters {
    let crop = sampleResizedCrop(width: width, height: height, scale: config.scale, ratio: config.ratio, rng: &rng)
    let flip = rng.uniform() < config.flipProbability
    // RandomApply: skipped when p < rand.
    let jitter = config.jitterProbability < rng.uniform() ? nil : sampleColorJitter(config.jitter, rng: &rng)
    var perspective: [Float]?
    if rng.uniform() < config.perspectiveProbability {
        perspective = samplePerspective(width: config.size, height: config.size, distortion: config.perspectiveDistortion, rng: &rng)
    }
    let second = config.secondJitter.map { sampleColorJitter($0, rng: &rng) }
    var blur: Double?
    if config.blurProbability >= 1 || rng.uniform() < config.blurProbability {
        blur = rng.uniform(config.blurRadius.lowerBound, config.blurRadius.upperBound)
    }
    return StrongViewParameters(cropTop: crop.top, cropLeft: crop.left, cropHeight: crop.height, cropWidth: crop.width,
                                flip: flip, jitter: jitter, perspective: perspective, secondJitter: second, blurRadius: blur)
}

/// ColorJitter.forward with drawn parameters.
public func colorJitter(_ image: RGBImage, _ p: ColorJitterParameters) -> RGBImage {
    var image = image
    for op in p.order {
        switch op {
        case 0: image = adjustBrightness(image, factor: p.brightness)
        case 1: image = adjustContrast(image, factor: p.contrast)
        case 2: image = adjustSaturation(image, factor: p.saturation)
        default: image = adjustHue(image, factor: p.hue)
        }
    }
    return image
}

/// Applies one strong view's parameters: (size, size) uint8 RGB.
public func applyStrongView(_ image: RGBImage, _ p: StrongViewParameters, size: Int = 224) -> RGBImage {
    var out = resizedCrop(image, top: p.cropTop, left: p.cropLeft, height: p.cropHeight, width: p.cropWidth, size: size)
    if p.flip { out = flipHorizontal(out) }
    if let j = p.jitter { out = colorJitter(out, j) }
    if let c = p.perspective { out = perspective(out, coefficients: c) }
    if let j = p.secondJitter { out = colorJitter(out, j) }
    if let r = p.blurRadius { out = gaussianBlur(out, radius: r) }
    return out
}

/// One strong view as the network's input: (3, size, size) Float32, normalised.
public func strongView(_ image: RGBImage, config: StrongViewConfig = StrongViewConfig(), rng: inout AugmentRNG,
                       mean: [Float] = WeakViewConfig.clipMean, std: [Float] = WeakViewConfig.clipStd) -> [Float] {
    let p = sampleStrongView(width: image.width, height: image.height, config: config, rng: &rng)
    return normalizeCHW(applyStrongView(image, p, size: config.size), mean: mean, std: std)
}
