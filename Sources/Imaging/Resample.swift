import Foundation

/// Pillow's separable resampling filters (libImaging/Resample.c).
public enum ResampleFilter: Sendable {
    case bilinear
    case bicubic

    var support: Double {
        switch self {
        case .bilinear: return 1.0
        case .bicubic: return 2.0
        }
    }

    func weight(_ x: Double) -> Double {
        let x = abs(x)
        switch self {
        case .bilinear:
            return x < 1.0 ? 1.0 - x : 0.0
        case .bicubic:
            let a = -0.5
            if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 }
            if x < 2.0 { return (((x - 5) * x + 8) * x - 4) * a }
            return 0.0
        }
    }
}

/// Fixed-point fraction bits of Pillow's 8-bit coefficients: 32 - 8 - 2.
let precisionBits = 22

/// One axis of a Pillow resample: for every output index, the first input index and the fixed-point
/// weights of its taps. Only outputs in `range` are computed (each depends only on its own index, so a
/// crop of the full resample is bit-identical).
struct ResampleAxis {
    var first: [Int]       // (count,)
    var taps: [Int]        // (count,)
    var weights: [Int32]   // (count, kernelSize), zero past taps
    var kernelSize: Int    // Pillow's ceil(support) * 2 + 1, rounded up to a multiple of 8 for SIMD8 loads

    init(inSize: Int, outSize: Int, range: Range<Int>, filter: ResampleFilter) {
        // Pillow: box = (0, inSize) as float, scale = (in1 - in0) / outSize, support widened on downscale.
        let scale = Double(Float(inSize)) / Double(outSize)
        let filterScale = max(scale, 1.0)
        let support = filter.support * filterScale
        kernelSize = (Int(ceil(support)) * 2 + 1 + 7) / 8 * 8
        first = []
        taps = []
        weights = [Int32](repeating: 0, count: range.count * kernelSize)
        first.reserveCapacity(range.count)
        taps.reserveCapacity(range.count)
        let invFilterScale = 1.0 / filterScale
        var k = [Double](repeating: 0, count: kernelSize)
        for (row, xx) in range.enumerated() {
            let center = (Double(xx) + 0.5) * scale
            var xmin = Int(center - support + 0.5)  // C (int) truncation
            if xmin < 0 { xmin = 0 }
            var xmax = Int(center + support + 0.5)
            if xmax > inSize { xmax = inSize }
            xmax -= xmin
            var ww = 0.0
            for x in 0..<xmax {
                let w = filter.weight((Double(x + xmin) - center + 0.5) * invFilterScale)
                k[x] = w
                ww += w
            }
            for x in 0..<xmax {
                let w = ww != 0.0 ? k[x] / ww : k[x]
                // Pillow's normalize_coeffs_8bpc: round half away from zero.
                weights[row * kernelSize + x] = w < 0 ? Int32(-0.5 + w * Double(1 << precisionBits)) : Int32(0.5 + w * Double(1 << precisionBits))
            }
            first.append(xmin)
            taps.append(xmax)
        }
    }
}

@inline(__always) func clip8(_ v: Int32) -> UInt8 {
    let s = v >> Int32(precisionBits)
    return s < 0 ? 0 : s > 255 ? 255 : UInt8(s)
}

/// Pillow's `Image.resize((width, height), filter)` for an RGB image: horizontal pass then vertical pass,
/// each rounding and clipping to uint8. `crop` (in output coordinates) limits the work to a window of the
/// result; the pixels are bit-identical to cropping the full resize.
public func resample(_ image: RGBImage, width: Int, height: Int, filter: ResampleFilter,
                     crop: (x: Int, y: Int, width: Int, height: Int)? = nil) -> RGBImage {
    precondition(width > 0 && height > 0 && image.width > 0 && image.height > 0, "resample: empty image or size")
    let window = crop ?? (0, 0, width, height)
    precondition(window.x >= 0 && window.y >= 0 && window.x + window.width <= width && window.y + window.height <= height,
                 "resample: crop \(window) outside \(width)×\(height)")
    if width == image.width && height == image.height {
        return cropImage(image, left: window.x, top: window.y, width: window.width, height: window.height)
    }
    let needHorizontal = width != image.width
    let needVertical = height != image.height
    let vertical = ResampleAxis(inSize: image.height, outSize: height, range: window.y..<(window.y + window.height), filter: filter)
    // Rows of the source the vertical pass reads.
    let rowFirst = needVertical ? vertical.first[0] : window.y
    let rowEnd = needVertical ? vertical.first[window.height - 1] + vertical.taps[window.height - 1] : window.y + window.height

    // Horizontal pass: (rowEnd - rowFirst, window.width, 3).
    var temp: [UInt8]
    let tempRows = rowEnd - rowFirst
    if needHorizontal {
        let horizontal = ResampleAxis(inSize: image.width, outSize: width, range: window.x..<(window.x + window.width), filter: filter)
        temp = [UInt8](repeating: 0, count: tempRows * window.width * 3)
        let ks = horizontal.kernelSize
        // Each row is split into three Int32 planes, zero-padded by ks so SIMD8 loads past the last
        // tap stay in bounds (their weights are zero). Integer sums: the order of taps does not matter.
        let plane = image.width + ks
        let planes = UnsafeMutablePointer<Int32>.allocate(capacity: 3 * plane)
        planes.initialize(repeating: 0, count: 3 * plane)
        defer { planes.deallocate() }
        let r = planes, g = planes + plane, b = planes + 2 * plane
        image.pixels.withUnsafeBufferPointer { src in
            temp.withUnsafeMutableBufferPointer { dst in
                horizontal.weights.withUnsafeBufferPointer { kk in
                    for y in 0..<tempRows {
                        let lineIn = src.baseAddress! + (y + rowFirst) * image.width * 3
                        let lineOut = dst.baseAddress! + y * window.width * 3
                        for x in 0..<image.width {
                            r[x] = Int32(lineIn[x * 3])
                            g[x] = Int32(lineIn[x * 3 + 1])
                            b[x] = Int32(lineIn[x * 3 + 2])
                        }
                        for xx in 0..<window.width {
                            let xmin = horizontal.first[xx], n = horizontal.taps[xx]
                            let k = kk.baseAddress! + xx * ks
                            var s0 = SIMD8<Int32>(), s1 = s0, s2 = s0
                            var t = 0
                            while t < n {
                                let w = UnsafeRawPointer(k + t).loadUnaligned(as: SIMD8<Int32>.self)
                                s0 &+= w &* UnsafeRawPointer(r + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                                s1 &+= w &* UnsafeRawPointer(g + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                                s2 &+= w &* UnsafeRawPointer(b + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                                t += 8
                            }
                            let half: Int32 = 1 << Int32(precisionBits - 1)
                            lineOut[xx * 3] = clip8(s0.wrappedSum() &+ half)
                            lineOut[xx * 3 + 1] = clip8(s1.wrappedSum() &+ half)
                            lineOut[xx * 3 + 2] = clip8(s2.wrappedSum() &+ half)
                        }
                    }
                }
            }
        }
    } else {
        temp = cropImage(image, left: window.x, top: rowFirst, width: window.width, height: tempRows).pixels
    }
    if !needVertical {
        return RGBImage(width: window.width, height: window.height, pixels: temp)
    }

    // Vertical pass over the horizontally resampled rows: (window.height, window.width, 3).
    let rowLength = window.width * 3
    var out = [UInt8](repeating: 0, count: window.height * rowLength)
    let ks = vertical.kernelSize
    temp.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            vertical.weights.withUnsafeBufferPointer { kk in
                var acc = [Int32](repeating: 0, count: rowLength)
                acc.withUnsafeMutableBufferPointer { acc in
                    for yy in 0..<window.height {
                        let ymin = vertical.first[yy] - rowFirst, n = vertical.taps[yy]
                        let k = kk.baseAddress! + yy * ks
                        for i in 0..<rowLength { acc[i] = 1 << Int32(precisionBits - 1) }
                        for y in 0..<n {
                            let w = k[y]
                            let line = src.baseAddress! + (ymin + y) * rowLength
                            for i in 0..<rowLength { acc[i] &+= Int32(line[i]) &* w }
                        }
                        let lineOut = dst.baseAddress! + yy * rowLength
                        for i in 0..<rowLength { lineOut[i] = clip8(acc[i]) }
                    }
                }
            }
        }
    }
    return RGBImage(width: window.width, height: window.height, pixels: out)
}

/// Pillow's resize with its bicubic filter.
public func resizeBicubic(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
    resample(image, width: width, height: height, filter: .bicubic)
}

/// Pillow's `Image.crop((left, top, left + width, top + height))`; pixels outside the image are black.
public func cropImage(_ image: RGBImage, left: Int, top: Int, width: Int, height: Int) -> RGBImage {
    precondition(width >= 0 && height >= 0, "cropImage: negative size")
    var out = [UInt8](repeating: 0, count: width * height * 3)
    let x0 = max(left, 0), x1 = min(left + width, image.width)
    if x1 > x0 {
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in max(top, 0)..<max(max(top, 0), min(top + height, image.height)) {
                    let s = src.baseAddress! + (y * image.width + x0) * 3
                    let d = dst.baseAddress! + ((y - top) * width + (x0 - left)) * 3
                    d.update(from: s, count: (x1 - x0) * 3)
                }
            }
        }
    }
    return RGBImage(width: width, height: height, pixels: out)
}
