"""Getting images in: uploads, server files and URLs, turned into RGB images or refused safely."""
