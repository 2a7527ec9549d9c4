import Foundation
import Imaging
import Method
import Models
import Queue

// What each NoLA stage hands to the next (NolaPipeline.swift): plain values, each holding the one
// before it, so a stage sees exactly what the stages before it produced and nothing is set later.

/// validate → the job's parameters and model folders, checked before any work.
struct Validated {
    let parameters: NolaParameters
    /// `parameters` as recorded (the folders actually used), for the prompts blob.
    let parametersJSON: String
    let clipFolder: URL
    /// Nil for inference-only jobs.
    let dinoFolder: URL?
    /// Inference only: the tuned prompts of an earlier job.
    let promptsFromJob: Int64?
    /// Incremental labelling (with `promptsFromJob`): label only image contents not labelled with those
    /// prompts yet, copy the label rows of the rest (docs/incremental.md).
    let onlyNew: Bool
}

/// describe → the CLIP model the stages use (ModelCache.CLIPEntry: the one place a backbone enters the
/// pipeline) and the zero-shot classifier built from the class sentences.
struct Described {
    let validated: Validated
    let clip: ModelCache.CLIPEntry
    /// (C, E) class embeddings, normalised.
    let classifier: [Float]

    var parameters: NolaParameters { validated.parameters }
    var imageSize: Int { clip.model.imageSize }
    /// The weak view at the model's image_size, normalised with the model's mean and std (CLIP's; MobileCLIP's
    /// preprocess_cfg: 0 and 1). DINO reads the same view renormalised to CLIP's statistics (`dinoPixels`).
    var weakConfig: WeakViewConfig { Self.weakConfig(clip.model) }

    /// Weak-view pixels (B,3,S,S) as DINO reads them: with CLIP's mean and std, as the NoLA reference feeds
    /// DINO CLIP's view. The pixels themselves when the model normalises as CLIP does.
    func dinoPixels(_ pixels: [Float]) -> [Float] { Self.dinoPixels(pixels, model: clip.model) }

    static func weakConfig(_ model: any ImageTextModel) -> WeakViewConfig {
        WeakViewConfig(resize: model.imageSize, crop: model.imageSize, mean: model.imageMean, std: model.imageStd)
    }

    static func dinoPixels(_ pixels: [Float], model: any ImageTextModel) -> [Float] {
        let mean = model.imageMean, std = model.imageStd
        let clipMean = WeakViewConfig.clipMean, clipStd = WeakViewConfig.clipStd
        if mean == clipMean && std == clipStd { return pixels }
        let plane = model.imageSize * model.imageSize
        var out = pixels
        for i in 0..<out.count {
            let c = (i / plane) % 3
            out[i] = (pixels[i] * std[c] + mean[c] - clipMean[c]) / clipStd[c]
        }
        return out
    }
}

/// encode → every image of the job, which could be decoded, and the weak-view features of those.
struct Encoded {
    let described: Described
    /// Nil for inference-only jobs.
    let dino: ModelCache.DINOEntry?
    /// Every image of the job, in nola.images order.
    let images: [ImageRecord]
    /// Path → why it could not be decoded.
    let unreadable: [String: String]
    /// Indices into `images` of the readable ones; the features below, and every later per-image array,
    /// follow this order.
    let readable: [Int]
    /// (readable, E) CLIP image features.
    let clipFeatures: [Float]
    /// (readable, D) DINO CLS features; empty for inference-only jobs.
    let dinoFeatures: [Float]
    /// The class index each readable image's folder names, when every folder names a class.
    let truth: [Int]?

    var validated: Validated { described.validated }
    var parameters: NolaParameters { described.validated.parameters }
    var clip: ModelCache.CLIPEntry { described.clip }

    /// The image file of the `i`-th readable image.
    func file(_ context: JobContext, readableIndex i: Int) -> ImageFile {
        file(context, image: readable[i])
    }

    /// The image file, by its exact bytes when its name is not valid UTF-8.
    func file(_ context: JobContext, image i: Int) -> ImageFile {
        Encoded.file(context, images[i])
    }

    static func file(_ context: JobContext, _ image: ImageRecord) -> ImageFile {
        ImageFile(folder: context.collection.path, relative: image.pathBytes ?? Array(image.path.utf8))
    }
}

/// pseudolabel → the zero-shot labels and, unless the job only infers, stage 2's teacher.
struct Taught {
    let encoded: Encoded
    /// Per readable image.
    let zeroShotLabels: [Int]
    let zeroShotConfidences: [Float]
    /// Stage 2 (pseudo-labels, alignment module, teacher labels); nil for inference-only jobs.
    let stage2: PseudoLabelStage?
}

/// tune → the prompts the label stage labels with.
struct Tuned {
    enum Prompts {
        /// Tuned by this job, with the teacher labels tuning learned from (a resumed job's come from its
        /// checkpoint).
        case tuned(state: PromptTuningState, encoder: PromptTunableEncoder, teacherLabels: [Int])
        /// Inference only: the label stage loads the prompts of this earlier job.
        case fromJob(Int64)
    }
    let taught: Taught
    let prompts: Prompts

    var encoded: Encoded { taught.encoded }
}
