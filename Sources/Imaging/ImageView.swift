import Foundation

/// A deterministic preprocessing of a decoded RGB image into a network input, general enough for both
/// nolad's weak view (torchvision's Resize + CenterCrop + ToTensor + Normalize) and a Hugging Face image
/// processor's (resize, centre crop, rescale, normalise on a Pillow image). Built from a WeakViewConfig or
/// from a model's preprocessor_config.json (Method's `ImageView(preprocessor:)`).
public struct ImageView: Sendable, Equatable {
    public enum Resize: Sendable, Equatable {
        /// Shorter side to n, the longer side int(n · long / short), as torchvision's Resize(int) and
        /// transformers' `get_resize_output_image_size(default_to_square=False)`.
        case shortestEdge(Int)
        /// Exactly width × height.
        case exact(width: Int, height: Int)
    }
    public enum Filter: Sendable, Equatable { case nearest, bilinear, bicubic }
    /// Where a centre crop starts. torchvision: round-half-even((size − crop) / 2), and a crop larger than
    /// the image pads floor((crop − size) / 2) on the top/left. transformers (its Pillow/NumPy backend):
    /// floor((size − crop) / 2), padding ceil((crop − size) / 2) on the top/left.
    public enum CropRule: Sendable, Equatable { case torchvision, transformers }

    public var resize: Resize?
    public var filter: Filter
    public var crop: (width: Int, height: Int)?
    public var cropRule: CropRule
    /// Pixel values are multiplied by this (Float(Double(p) · factor), as transformers' `rescale`;
    /// identical to torch's p / 255 for 1/255); nil: left as 0…255.
    public var rescaleFactor: Double?
    /// (x − mean) / std per channel in Float32; nil: not normalised.
    public var mean: [Float]?
    public var std: [Float]?

    public init(resize: Resize?, filter: Filter, crop: (width: Int, height: Int)?, cropRule: CropRule,
                rescaleFactor: Double?, mean: [Float]?, std: [Float]?) {
        precondition((mean == nil) == (std == nil) && (mean?.count ?? 3) == 3 && (std?.count ?? 3) == 3, "ImageView: mean and std need 3 values each")
        self.resize = resize
        self.filter = filter
        self.crop = crop
        self.cropRule = cropRule
        self.rescaleFactor = rescaleFactor
        self.mean = mean
        self.std = std
    }

    /// The weak view: Resize(resize, bicubic), CenterCrop(crop) as torchvision, ToTensor, Normalize.
    public init(_ weak: WeakViewConfig) {
        self.init(resize: .shortestEdge(weak.resize), filter: .bicubic, crop: (weak.crop, weak.crop), cropRule: .torchvision,
                  rescaleFactor: 1.0 / 255.0, mean: weak.mean, std: weak.std)
    }

    public static func == (a: ImageView, b: ImageView) -> Bool {
        a.resize == b.resize && a.filter == b.filter && a.crop?.width == b.crop?.width && a.crop?.height == b.crop?.height
            && a.cropRule == b.cropRule && a.rescaleFactor == b.rescaleFactor && a.mean == b.mean && a.std == b.std
    }

    /// Size after the resize step.
    public func resizedSize(width: Int, height: Int) -> (width: Int, height: Int) {
        switch resize {
        case nil: return (width, height)
        case .shortestEdge(let n): return shorterSideSize(width: width, height: height, size: n)
        case .exact(let w, let h): return (w, h)
        }
    }

    /// Size of the output for a width × height image.
    public func outputSize(width: Int, height: Int) -> (width: Int, height: Int) {
        crop ?? resizedSize(width: width, height: height)
    }

    /// The output's size when it does not depend on the image, else nil.
    public var fixedOutputSize: (width: Int, height: Int)? {
        if let crop { return crop }
        if case .exact(let w, let h) = resize { return (w, h) }
        return nil
    }

    /// Top-left of the crop in the resized image's coordinates (negative: padding).
    func cropOrigin(width: Int, height: Int, crop: (width: Int, height: Int)) -> (x: Int, y: Int) {
        switch cropRule {
        case .torchvision:
            return centerCropOrigin(width: width, height: height, cropWidth: crop.width, cropHeight: crop.height)
        case .transformers:
            func offset(_ size: Int, _ crop: Int) -> Int { crop > size ? -((crop - size + 1) / 2) : (size - crop) / 2 }
            return (offset(width, crop.width), offset(height, crop.height))
        }
    }

    /// The uint8 image after resize and crop. Only the cropped window of the resize is computed where the
    /// crop lies inside it; the pixels are identical to the full resize followed by the crop.
    public func resizedAndCropped(_ image: RGBImage) -> RGBImage {
        let size = resizedSize(width: image.width, height: image.height)
        let same = size.width == image.width && size.height == image.height
        func resized(window: (x: Int, y: Int, width: Int, height: Int)?) -> RGBImage {
            if same {
                guard let w = window else { return image }
                return cropImage(image, left: w.x, top: w.y, width: w.width, height: w.height)
            }
            switch filter {
            case .nearest: return resizeNearest(image, width: size.width, height: size.height, crop: window)
            case .bilinear: return resample(image, width: size.width, height: size.height, filter: .bilinear, crop: window)
            case .bicubic: return resample(image, width: size.width, height: size.height, filter: .bicubic, crop: window)
            }
        }
        guard let crop else { return resized(window: nil) }
        let o = cropOrigin(width: size.width, height: size.height, crop: crop)
        if o.x >= 0 && o.y >= 0 && o.x + crop.width <= size.width && o.y + crop.height <= size.height {
            return resized(window: (o.x, o.y, crop.width, crop.height))
        }
        return cropImage(resized(window: nil), left: o.x, top: o.y, width: crop.width, height: crop.height)
    }

    /// The network input: (3, H, W) Float32 channel-major, with H×W = outputSize.
    public func apply(_ image: RGBImage) -> (pixels: [Float], width: Int, height: Int) {
        let view = resizedAndCropped(image)
        let plane = view.width * view.height
        let factor = rescaleFactor
        let pixels = [Float](unsafeUninitializedCapacity: 3 * plane) { out, count in
            view.pixels.withUnsafeBufferPointer { src in
                for c in 0..<3 {
                    let dst = out.baseAddress! + c * plane
                    for i in 0..<plane {
                        let p = src[i * 3 + c]
                        dst[i] = factor.map { Float(Double(p) * $0) } ?? Float(p)
                    }
                    if let mean, let std {
                        let m = mean[c], s = std[c]
                        for i in 0..<plane { dst[i] = (dst[i] - m) / s }
                    }
                }
            }
            count = 3 * plane
        }
        return (pixels, view.width, view.height)
    }
}

/// Pillow's `Image.resize((width, height), NEAREST)` (ImagingScaleAffine): output x takes input
/// int((x + 0.5) · in / out), the position accumulated in double precision as Pillow does. `crop` (in
/// output coordinates) limits the work to a window of the result.
public func resizeNearest(_ image: RGBImage, width: Int, height: Int, crop: (x: Int, y: Int, width: Int, height: Int)? = nil) -> RGBImage {
    precondition(width > 0 && height > 0 && image.width > 0 && image.height > 0, "resizeNearest: empty image or size")
    let window = crop ?? (0, 0, width, height)
    precondition(window.x >= 0 && window.y >= 0 && window.x + window.width <= width && window.y + window.height <= height,
                 "resizeNearest: crop \(window) outside \(width)×\(height)")
    func table(inSize: Int, outSize: Int) -> [Int] {
        let a = Double(inSize) / Double(outSize)
        var position = a * 0.5
        var out = [Int](repeating: 0, count: outSize)
        for i in 0..<outSize {
            out[i] = position < 0 || Int(position) >= inSize ? -1 : Int(position)  // -1: Pillow leaves it black
            position += a
        }
        return out
    }
    let xs = table(inSize: image.width, outSize: width), ys = table(inSize: image.height, outSize: height)
    var out = [UInt8](repeating: 0, count: window.width * window.height * 3)
    image.pixels.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            for y in 0..<window.height where ys[window.y + y] >= 0 {
                let line = src.baseAddress! + ys[window.y + y] * image.width * 3
                let lineOut = dst.baseAddress! + y * window.width * 3
                for x in 0..<window.width where xs[window.x + x] >= 0 {
                    let s = line + xs[window.x + x] * 3
                    lineOut[x * 3] = s[0]
                    lineOut[x * 3 + 1] = s[1]
                    lineOut[x * 3 + 2] = s[2]
                }
            }
        }
    }
    return RGBImage(width: window.width, height: window.height, pixels: out)
}
