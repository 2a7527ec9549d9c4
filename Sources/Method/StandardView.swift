import Foundation
import Imaging
import Models

// The model's standard view ("its own preprocessing"): what `nolad embed-image --view standard` gives an
// image. A folder with a preprocessor_config.json gets what transformers' image processor does with it
// (its Pillow backend: Pillow resize, floor-offset centre crop, rescale, normalise); without one, nolad's
// rules. The NoLA pipeline does not use this: its weak view is fixed by DESIGN.md (docs/views.md).

extension ImageView {
    /// transformers' processing for `p` on a Pillow RGB image.
    public init(preprocessor p: ImagePreprocessorConfig) {
        let resize: Resize?
        switch p.size {
        case _ where !p.doResize: resize = nil
        case .shortestEdge(let n): resize = .shortestEdge(n)
        case .exact(let h, let w): resize = .exact(width: w, height: h)
        }
        let filter: Filter
        switch p.resample {
        case .nearest: filter = .nearest
        case .bilinear: filter = .bilinear
        case .bicubic: filter = .bicubic
        }
        self.init(resize: resize, filter: filter, crop: p.doCenterCrop ? (p.cropSize.width, p.cropSize.height) : nil,
                  cropRule: .transformers, rescaleFactor: p.doRescale ? p.rescaleFactor : nil,
                  mean: p.doNormalize ? p.imageMean : nil, std: p.doNormalize ? p.imageStd : nil)
    }
}

/// What input sizes a vision tower takes.
public enum InputSizeRule: Sendable, Equatable {
    /// Exactly side × side (CLIP, ViT: fixed position embeddings).
    case square(Int)
    /// Any height and width that are multiples of the patch (DINOv2 interpolates its position embeddings).
    case multipleOf(Int)

    public func accepts(width: Int, height: Int) -> Bool {
        switch self {
        case .square(let s): return width == s && height == s
        case .multipleOf(let p): return width > 0 && height > 0 && width % p == 0 && height % p == 0
        }
    }

    public var description: String {
        switch self {
        case .square(let s): return "\(s)×\(s) images"
        case .multipleOf(let p): return "images whose sides are multiples of \(p)"
        }
    }
}

/// The standard view of a model folder: `preprocessor_config.json` when present (refused, naming the file,
/// when its output cannot fit the model), else `fallback` (nolad's rules for the model type).
/// `modelType` is config.json's model_type.
public func standardView(folder: URL, modelType: String, input: InputSizeRule, fallback: WeakViewConfig) throws -> ImageView {
    guard let p = try ImagePreprocessorConfig.read(folder: folder, modelType: modelType) else { return ImageView(fallback) }
    let view = ImageView(preprocessor: p)
    let file = folder.appendingPathComponent(ImagePreprocessorConfig.fileName).path
    if let size = view.fixedOutputSize {
        guard input.accepts(width: size.width, height: size.height) else {
            throw CheckpointError.badConfig(file: file, reason: "its images are \(size.width)×\(size.height) (width × height) but the model takes \(input.description)")
        }
    } else if case .square = input {
        let how = p.doResize ? "resizes the shorter side without a centre crop" : "neither resizes to a fixed size nor crops"
        throw CheckpointError.badConfig(file: file, reason: "it \(how), so its images have no fixed size, but the model takes \(input.description)")
    }
    return view
}

extension ImageView {
    /// open_clip's eval transform for a `preprocess_cfg` (resize_mode shortest, square image_size): torchvision's
    /// Resize(image_size, interpolation) of the shorter side on the Pillow image, CenterCrop(image_size),
    /// ToTensor, Normalize(mean, std). MobileCLIP's standard view (mean 0, std 1, bilinear).
    public init(openCLIP p: OpenCLIPPreprocess, imageSize s: Int) {
        self.init(resize: .shortestEdge(s), filter: p.interpolation == .bilinear ? .bilinear : .bicubic, crop: (s, s),
                  cropRule: .torchvision, rescaleFactor: 1.0 / 255.0, mean: p.mean, std: p.std)
    }
}
