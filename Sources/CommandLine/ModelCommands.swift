import ArgumentParser
import Daemon
import Foundation
import Imaging
import Kernels
import Method
import Models

/// A model subcommand's failure, printed on stderr (non-zero exit).
struct ModelCommandError: Error, CustomStringConvertible {
    let description: String
}

/// What a model folder holds (config.json's `model_type`, or an open_clip folder), and the view its images get by default.
struct ImageEncoder {
    enum Model {
        /// CLIP or MobileCLIP (`loadImageTextModel`).
        case clip(any ImageTextModel)
        case vit(ViTModel)
    }
    let model: Model
    /// The model's standard view: its preprocessor_config.json, else nolad's rules (`defaultView`).
    let standardView: ImageView

    init(folder: URL) throws {
        let type = try modelType(folder: folder)
        switch type {
        case "clip": model = .clip(try loadImageTextModel(folder: folder))
        case "vit", "dinov2": model = .vit(try ViTModel(folder: folder))
        case let other:
            throw ModelCommandError(description: "\(folder.path)/config.json: model_type \(other ?? "(none)") is not clip, vit or dinov2")
        }
        let fallback: WeakViewConfig
        switch model {
        case .clip: fallback = Self.clipStyleView(imageSize: Self.imageSize(model))
        case .vit: fallback = Self.dinoStyleView(imageSize: Self.imageSize(model))
        }
        if case .clip(let m as MobileCLIPModel) = model {
            // open_clip's eval transform for the folder's preprocess_cfg (MobileCLIP: bilinear, mean 0, std 1)
            standardView = ImageView(openCLIP: m.config.preprocess, imageSize: m.imageSize)
        } else {
            standardView = try Method.standardView(folder: folder, modelType: type!, input: Self.inputRule(model), fallback: fallback)
        }
    }

    /// Square input side the model is configured for (DINOv2 accepts any multiple of its patch size).
    static func imageSize(_ model: Model) -> Int {
        switch model {
        case .clip(let m): return m.imageSize
        case .vit(let m): return m.config.imageSize
        }
    }
    var imageSize: Int { Self.imageSize(model) }

    static func inputRule(_ model: Model) -> InputSizeRule {
        switch model {
        case .vit(let m) where m.kind == .dinov2: return .multipleOf(m.config.patchSize)
        default: return .square(imageSize(model))
        }
    }
    var inputRule: InputSizeRule { Self.inputRule(model) }

    /// Without a preprocessor_config.json, CLIP: shorter side to image_size (bicubic), centre crop, CLIP mean/std.
    static func clipStyleView(imageSize size: Int) -> WeakViewConfig {
        WeakViewConfig(resize: size, crop: size, mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd)
    }
    /// Without a preprocessor_config.json, DINO/DINOv2: shorter side to 256/224 of image_size, centre crop, ImageNet mean/std.
    static func dinoStyleView(imageSize size: Int) -> WeakViewConfig {
        WeakViewConfig(resize: Int((Double(size) * 256 / 224).rounded()), crop: size,
                       mean: WeakViewConfig.imagenetMean, std: WeakViewConfig.imagenetStd)
    }

    /// CLIP: get_image_features; DINO/DINOv2: final-norm CLS token. pixels (B,3,H,W).
    func embed(_ pixels: [Float], batch: Int, width: Int, height: Int) -> [Float] {
        pixels.withUnsafeBufferPointer { p in
            switch model {
            case .clip(let m): return m.getImageFeatures(pixels: p.baseAddress!, batch: batch)
            case .vit(let m): return m.clsFeatures(pixels: p.baseAddress!, batch: batch, height: height, width: width)
            }
        }
    }
}

/// One JSON object as a line. Numbers must be finite (JSON has no NaN): callers check embeddings with `finite`.
func jsonLine(_ object: [String: Any]) -> String {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
    return String(decoding: data, as: UTF8.self)
}

/// `embedding` unchanged, or a sentence when a value is NaN or infinite (damaged weights, or a raw input
/// tensor holding such values): JSON cannot carry them.
func finite(_ embedding: ArraySlice<Float>, of what: String) throws -> [Double] {
    guard embedding.allSatisfy(\.isFinite) else {
        throw ModelCommandError(description: "\(what): the embedding has NaN or infinite values (damaged model weights or input)")
    }
    return embedding.map(Double.init)
}

/// Reads a raw tensor file: little-endian float32 values of one image, channel-major (3,S,S), already
/// preprocessed (resized, cropped, normalised); S is inferred from the size (square images only).
func readRawImage(_ path: String) throws -> (pixels: [Float], size: Int) {
    guard let data = FileManager.default.contents(atPath: path) else { throw ModelCommandError(description: "\(path): cannot read file") }
    let count = data.count / 4
    let size = Int(Double(count / 3).squareRoot().rounded())
    guard data.count % 4 == 0, count > 0, 3 * size * size == count else {
        throw ModelCommandError(description: "\(path): \(data.count) bytes is not a float32 (3,S,S) tensor")
    }
    let pixels = data.withUnsafeBytes { raw in (0..<count).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) } }
    return (pixels, size)
}

/// Prints `error` on stderr prefixed with the subcommand, for failures that end the command.
func fail(_ command: String, _ error: Error) -> ExitCode {
    FileHandle.standardError.write(Data("nolad \(command): \(error)\n".utf8))
    return ExitCode.failure
}

struct EmbedText: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "embed-text",
        abstract: "CLIP text embeddings (transformers' get_text_features) as JSON Lines, one object per text.")

    @Option(help: "CLIP model folder (config.json or open_clip_config.json, weights, vocab.json, merges.txt).") var model: String
    @Option(help: "Threads for the numeric kernels (GEMMs included).") var threads = 2
    @Argument(help: "Texts to embed.") var texts: [String]

    func validate() throws {
        guard !texts.isEmpty else { throw ValidationError("give at least one text") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
    }

    /// Every kernel of the command runs with `--threads` threads (docs/threading.md).
    func run() throws { try withThreads(threads) { try runWithThreads() } }

    func runWithThreads() throws {
        let folder = URL(fileURLWithPath: model)
        let clip: any ImageTextModel, tokenizer: CLIPTokenizer
        do {
            let type = try modelType(folder: folder)
            guard type == "clip" else {
                throw ModelCommandError(description: "\(folder.path)/config.json: model_type \(type ?? "(none)") is not clip")
            }
            clip = try loadImageTextModel(folder: folder)
            tokenizer = try CLIPTokenizer(folder: folder)
            try tokenizer.checkFits(clip.textConfig, source: folder.path)
        } catch {
            throw fail("embed-text", error)
        }
        let context = clip.textConfig.maxPositionEmbeddings
        let ids = texts.map { tokenizer.encode($0, contextLength: context).map { Int32($0) } }
        let features = clip.getTextFeatures(ids)
        let p = clip.projectionDim
        for (i, text) in texts.enumerated() {
            let embedding: [Double]
            do { embedding = try finite(features[(i * p)..<((i + 1) * p)], of: "text \(i + 1)") } catch { throw fail("embed-text", error) }
            print(jsonLine(["text": text, "embedding": embedding]))
        }
    }
}

struct EmbedImage: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "embed-image",
        abstract: "Image embeddings as JSON Lines: CLIP get_image_features, or the DINO/DINOv2 final-norm CLS token.",
        discussion: """
        Each FILE is a JPEG or PNG (recognised by content), decoded as Pillow does and given the model's standard \
        view: the folder's preprocessor_config.json as transformers' image processor applies it (Pillow backend) \
        when there is one; else CLIP — shorter side to image_size (bicubic), centre crop, CLIP mean/std; \
        DINO/DINOv2 — shorter side to 256/224 of image_size, centre crop, ImageNet mean/std. `--view clip` gives \
        any model NoLA's weak view (CLIP's rules at the model's image_size, as NoLA feeds DINO); `--view dino` \
        the DINO rules (docs/views.md). A FILE ending in .f32 is a raw, already preprocessed tensor instead: little-endian float32, \
        shape (3,S,S) channel-major.
        """)

    enum View: String, ExpressibleByArgument { case standard, clip, dino }

    @Option(help: "Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin).") var model: String
    @Option(help: "Threads for the numeric kernels (GEMMs included).") var threads = 2
    @Option(help: "Preprocessing: standard (the model's own: preprocessor_config.json, else nolad's rules), clip or dino.") var view: View = .standard
    @Argument(help: "JPEG/PNG files, or raw float32 (3,S,S) .f32 tensors.") var files: [String]

    func validate() throws {
        guard !files.isEmpty else { throw ValidationError("give at least one file") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
    }

    /// The view this model gets for a decoded image.
    func imageView(_ encoder: ImageEncoder) -> ImageView {
        switch view {
        case .standard: return encoder.standardView
        case .clip:
            // NoLA's weak view as the pipeline gives this model (a MobileCLIP: its own mean and std)
            if case .clip(let m) = encoder.model {
                return ImageView(WeakViewConfig(resize: encoder.imageSize, crop: encoder.imageSize, mean: m.imageMean, std: m.imageStd))
            }
            return ImageView(ImageEncoder.clipStyleView(imageSize: encoder.imageSize))
        case .dino: return ImageView(ImageEncoder.dinoStyleView(imageSize: encoder.imageSize))
        }
    }

    /// Every kernel of the command runs with `--threads` threads (docs/threading.md).
    func run() throws { try withThreads(threads) { try runWithThreads() } }

    func runWithThreads() throws {
        let encoder: ImageEncoder
        do { encoder = try ImageEncoder(folder: URL(fileURLWithPath: model)) } catch { throw fail("embed-image", error) }
        let imageView = imageView(encoder)
        var failed = 0
        for file in files {
            do {
                let pixels: [Float], width: Int, height: Int
                if file.hasSuffix(".f32") {
                    let raw = try readRawImage(file)
                    (pixels, width, height) = (raw.pixels, raw.size, raw.size)
                } else {
                    (pixels, width, height) = imageView.apply(try decodeImage(at: URL(fileURLWithPath: file), options: DecodeOptions()))
                }
                guard encoder.inputRule.accepts(width: width, height: height) else {
                    throw ModelCommandError(description: "\(file): image is \(width)×\(height), the model takes \(encoder.inputRule.description)")
                }
                let embedding = try finite(encoder.embed(pixels, batch: 1, width: width, height: height)[...], of: file)
                print(jsonLine(["file": file, "embedding": embedding]))
            } catch {
                failed += 1
                _ = fail("embed-image", error)
            }
        }
        if failed > 0 { throw ExitCode.failure }
    }
}

func processCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// VmHWM of this process from /proc/self/status, in MB (0 where unavailable).
func peakResidentMegabytes() -> Double {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
          let kb = Double(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
    return kb / 1024
}
